"""The simulated devices against the real tools operators use: ipmitool, and
the ClusterLabs fence agents. If these accept our simulators, the simulators
are faithful enough for our drivers' tests to mean something."""

from __future__ import annotations

import subprocess

import pytest

from tests.peers import COMMUNITY, PASSWORD, V3_AUTH, V3_PRIV, Lab, need

pytestmark = pytest.mark.timeout(90)


def run(*cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)


def test_ipmitool_reads_and_switches_the_simulated_bmc(devices: Lab) -> None:
    ipmitool = need("ipmitool")
    base = [ipmitool, "-I", "lanplus", "-H", "127.0.0.1", "-p", str(devices.bmc_ports["h1"]), "-U", "admin",
            "-P", PASSWORD]
    assert run(*base, "chassis", "power", "on").returncode == 0
    assert run(*base, "chassis", "power", "status").stdout.strip() == "Chassis Power is on"
    assert run(*base, "chassis", "power", "off").returncode == 0
    import time

    time.sleep(0.2)
    assert run(*base, "chassis", "power", "status").stdout.strip() == "Chassis Power is off"
    assert devices.power.read("h1") == "off"
    wrong = run(ipmitool, "-I", "lanplus", "-H", "127.0.0.1", "-p", str(devices.bmc_ports["h1"]), "-U", "admin",
                "-P", "wrong", "chassis", "power", "status")
    assert wrong.returncode != 0


def test_fence_ipmilan_fences_the_simulated_bmc(devices: Lab) -> None:
    agent = need("fence_ipmilan")
    base = [agent, "-a", "127.0.0.1", "-u", str(devices.bmc_ports["h2"]), "-l", "admin", "-p", PASSWORD, "-P",
            "-C", "3", "--power-wait=0"]
    assert run(*base, "-o", "on").returncode == 0
    off = run(*base, "-o", "off")
    assert off.returncode == 0 and "Success: Powered OFF" in off.stdout
    status = run(*base, "-o", "status")
    assert status.returncode == 2 and "Status: OFF" in status.stdout
    assert devices.power.read("h2") == "off"


def test_fence_ipmilan_times_out_on_a_bmc_stuck_on(devices: Lab) -> None:
    agent = need("fence_ipmilan")
    result = run(agent, "-a", "127.0.0.1", "-u", str(devices.bmc_ports["stuck"]), "-l", "admin", "-p", PASSWORD,
                 "-P", "-C", "3", "--power-timeout=2", "-o", "off")
    assert result.returncode != 0
    assert devices.power.read("stuck") == "on"


def test_fence_apc_snmp_fences_an_outlet_of_the_simulated_pdu(devices: Lab) -> None:
    agent = need("fence_apc_snmp")
    base = [agent, "-a", "127.0.0.1", "-u", str(devices.pdu_port), "-c", COMMUNITY, "-d", "2c"]
    listing = run(*base, "-o", "list")
    assert listing.stdout.splitlines()[:3] == ["1,h1", "2,h2", "3,stuck"]
    assert run(*base, "-n", "2", "-o", "on").returncode == 0
    assert run(*base, "-n", "2", "-o", "off", "--power-wait=0").returncode == 0
    assert run(*base, "-n", "2", "-o", "status").returncode == 2
    assert devices.power.read("h2") == "off"


def test_fence_apc_snmp_speaks_v3_to_the_simulated_pdu(devices: Lab) -> None:
    agent = need("fence_apc_snmp")
    result = run(agent, "-a", "127.0.0.1", "-u", str(devices.pdu_port), "-d", "3", "-l", "fence", "-b", "sha",
                 "-p", V3_AUTH, "-B", "aes", "-P", V3_PRIV, "-E", "authPriv", "-n", "1", "-o", "on")
    assert result.returncode == 0, result.stdout + result.stderr
    assert devices.power.read("h1") == "on"


def test_snmpget_reads_the_outlet_tables(devices: Lab) -> None:
    snmpget = need("snmpget")
    result = run(snmpget, "-v1", "-c", COMMUNITY, "-On", f"127.0.0.1:{devices.pdu_port}",
                 ".1.3.6.1.2.1.1.2.0", ".1.3.6.1.4.1.318.1.1.12.3.5.1.1.2.3")
    assert result.returncode == 0
    assert ".1.3.6.1.4.1.318.1.3.4.5" in result.stdout
    assert 'STRING: "stuck"' in result.stdout


def test_fence_redfish_fences_the_simulated_redfish_bmc(devices: Lab) -> None:
    agent = need("fence_redfish")
    base = [agent, "--ip", "127.0.0.1", "--ipport", str(devices.redfish_ports["h1"]), "-l", "admin", "-p", PASSWORD,
            "--ssl-insecure"]
    assert run(*base, "-o", "on").returncode == 0
    off = run(*base, "-o", "off")
    assert off.returncode == 0 and "Success: Powered OFF" in off.stdout
    assert run(*base, "-o", "status").returncode == 2
    assert devices.power.read("h1") == "off"
