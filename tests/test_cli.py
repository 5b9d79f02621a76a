"""The operator's command line against simulated devices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from hafence.config import load_config
from hafence.contracts import Decoders, HostEvent
from hafence.lab.natsserver import NatsServer
from tests.conftest import provision
from tests.helpers import read_stream
from tests.peers import PASSWORD, Lab

pytestmark = pytest.mark.timeout(90)


def write_config(lab: Lab, path: Path, nats_url: str = "nats://127.0.0.1:1") -> Path:
    (path.parent / "wrong-password").write_text("not-it")
    path.write_text(f"""
[nats]
url = "{nats_url}"

[devices.bmc-h1]
driver = "ipmi"
address = "127.0.0.1"
port = {lab.bmc_ports["h1"]}
username = "admin"
password_file = "{lab.password_file}"
power_timeout_s = 3.0

[devices.bmc-stuck]
driver = "ipmi"
address = "127.0.0.1"
port = {lab.bmc_ports["stuck"]}
username = "admin"
password_file = "{lab.password_file}"
# Long enough for a fresh IPMI session on a loaded machine: the test is about the
# read-back saying "on", not about a slow login.
power_timeout_s = 4.0
retries = 0

[devices.pdu]
driver = "apc_snmp"
address = "127.0.0.1"
port = {lab.pdu_port}
community_file = "{lab.community_file}"

[devices.broken]
driver = "ipmi"
address = "127.0.0.1"
port = {lab.bmc_ports["h2"]}
username = "admin"
password_file = "{path.parent / 'wrong-password'}"

[[hosts]]
name = "h1"
memory_mb = 1024
levels = [{{ devices = [{{ device = "bmc-h1" }}] }}, {{ devices = [{{ device = "pdu", port = "1" }}] }}]

[[hosts]]
name = "h2"
memory_mb = 1024
levels = [{{ devices = [{{ device = "broken" }}] }}]

[[hosts]]
name = "stuck"
memory_mb = 1024
levels = [{{ devices = [{{ device = "bmc-stuck" }}] }}]

[[hosts]]
name = "bare"
memory_mb = 1024
""")
    return path


def hafence(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hafence.cli", *args], capture_output=True, text=True, timeout=60)


def test_fence_test_reports_working_levels_and_powers_nothing(devices: Lab, tmp_path: Path) -> None:
    config = write_config(devices, tmp_path / "c.toml")
    devices.power.switch("h1", "on")
    result = hafence("fence", "test", "h1", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "protected: levels 1, 2 working" in result.stdout
    assert devices.power.read("h1") == "on"


def test_fence_test_fails_for_a_host_without_a_working_level(devices: Lab, tmp_path: Path) -> None:
    config = write_config(devices, tmp_path / "c.toml")
    result = hafence("fence", "test", "h2", "--config", str(config), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["protected"] is False and "authentication failed" in report["reason"]
    bare = hafence("fence", "test", "bare", "--config", str(config))
    assert bare.returncode == 1 and "no fence levels configured" in bare.stdout


def test_fence_off_prints_evidence_and_exits_zero_only_when_confirmed(
    devices: Lab, tmp_path: Path, nats_server: NatsServer
) -> None:
    config = write_config(devices, tmp_path / "c.toml", nats_server.url)
    asyncio.run(provision(load_config(config)))
    devices.power.switch("h1", "on")
    off = hafence("fence", "off", "h1", "--config", str(config), "--reason", "runbook step 4", "--by", "alice")
    assert off.returncode == 0, off.stdout + off.stderr
    assert "off h1: confirmed_off: level 1 confirmed off (bmc-h1)" in off.stdout
    assert devices.power.read("h1") == "off"
    status = hafence("fence", "status", "h1", "--config", str(config))
    assert status.returncode == 0 and "power: off" in status.stdout
    on = hafence("fence", "on", "h1", "--config", str(config))
    assert on.returncode == 0 and devices.power.read("h1") == "on"
    stuck = hafence("fence", "off", "stuck", "--config", str(config), "--reason", "runbook step 4")
    assert stuck.returncode == 1 and "power still on" in stuck.stdout
    for output in (off, status, on, stuck):
        assert PASSWORD not in output.stdout + output.stderr
    # Only the confirmed fence counts, on the bus, as alice's confirmation with the evidence.
    [event] = asyncio.run(_host_events(nats_server.url))
    assert (event.host, event.kind, event.rule, event.by) == ("h1", "confirmed_fenced", "manual_fence", "alice")
    assert event.reason.startswith("runbook step 4 [hafence fence off: confirmed off: level 1 bmc-h1 (ipmi)")
    assert "read off" in event.reason and event.incident.startswith("manual-h1-")


def test_a_manual_fence_needs_a_reason_and_one_that_cannot_be_published_says_so(
    devices: Lab, tmp_path: Path
) -> None:
    config = write_config(devices, tmp_path / "c.toml")  # no NATS there
    devices.power.switch("h1", "on")
    bare = hafence("fence", "off", "h1", "--config", str(config))
    assert bare.returncode == 2 and "needs --reason" in bare.stderr and devices.power.read("h1") == "on"
    off = hafence("fence", "off", "h1", "--config", str(config), "--reason", "runbook step 4")
    assert off.returncode == 1 and devices.power.read("h1") == "off"
    assert "is off but this was NOT published" in off.stderr and "confirm-fenced h1" in off.stderr
    devices.power.switch("h1", "on")


async def _host_events(url: str) -> list[HostEvent]:
    nc = await nats.connect(url)
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", "hafence.host.*.*", Decoders.host_event)
    finally:
        await nc.close()


def test_fence_reboot_powers_off_then_on(devices: Lab, tmp_path: Path, nats_server: NatsServer) -> None:
    config = write_config(devices, tmp_path / "c.toml", nats_server.url)
    asyncio.run(provision(load_config(config)))
    result = hafence("fence", "reboot", "h1", "--config", str(config), "--json", "--reason", "hung kernel")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["announced"].startswith("manual-h1-")
    actions = [e["action_sent"] for e in json.loads(result.stdout)["evidence"]]
    assert actions == ["off", "on"] and devices.power.read("h1") == "on"


def test_unknown_host_and_bad_config_are_usage_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[timings]\nheartbeat_interval_s = "x"\n[[vms]]\nname = "v"\nhost = "nowhere"\nmemory_mb = 1\n')
    result = hafence("config", "check", str(bad))
    assert result.returncode == 2 and "bad.toml: timings.heartbeat_interval_s" in result.stderr
    good = tmp_path / "good.toml"
    good.write_text('[[hosts]]\nname = "h1"\nmemory_mb = 1\n')
    checked = hafence("config", "check", str(good))
    assert checked.returncode == 0 and "hosts without fence levels" in checked.stdout
    missing = hafence("fence", "off", "nope", "--config", str(good))
    assert missing.returncode == 2 and "host 'nope' is not in the configuration" in missing.stderr


def test_hafence_events_shows_a_placement_record_as_one_line_per_vm() -> None:
    """A record carries a wave's placements; ``hafence events`` reads as it did with a
    ``placed`` event per VM."""
    from hafence.cli.view import describe_event
    from hafence.contracts import Placements, VmEvent

    record = Placements(at=1.0, placed=[VmEvent(vm=vm, kind="placed", at=1.0, target=target)
                                        for vm, target in (("vm-a", "h2"), ("vm-b", "h3"))])
    assert describe_event(record).splitlines() == ["vm   vm-a       placed on h2", "vm   vm-b       placed on h3"]
