"""Fixtures for interop tests: simulated power devices on 127.0.0.1 and real
protocol peers (ipmitool, fence-agents, Net-SNMP) when installed.

CI installs the peers and sets HAFENCE_REQUIRE_PEERS=1, which turns a missing
peer into a failure instead of a skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hafence.lab.natsserver import free_port
from hafence.lab.peers import Peer, bmc_sim, free_udp_port, pdu_sim, redfish_sim
from hafence.lab.power import SimPowerSwitch
from hafence.lab.tlscert import make_self_signed

PASSWORD = "Pw-d0nt-l3ak-7731"
COMMUNITY = "Cm-s3cret-4409"
V3_AUTH = "V3auth-s3cret-1193"
V3_PRIV = "V3priv-s3cret-5521"
SECRETS = (PASSWORD, COMMUNITY, V3_AUTH, V3_PRIV)


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        if os.environ.get("HAFENCE_REQUIRE_PEERS") == "1":
            pytest.fail(f"{tool} is required (HAFENCE_REQUIRE_PEERS=1) but not installed")
        pytest.skip(f"{tool} not installed")
    return path


@dataclass
class Lab:
    dir: Path
    power: SimPowerSwitch
    password_file: Path
    community_file: Path
    v3_auth_file: Path
    v3_priv_file: Path
    bmc_ports: dict[str, int]
    pdu_port: int
    redfish_ports: dict[str, int]
    cert: Path


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A BMC per host (IPMI and Redfish) and one PDU with an outlet per host.
    Host "stuck" has devices that accept 'off' and stay on. One set per test
    module: tests must not assume a power state they did not set."""
    tmp_path = tmp_path_factory.mktemp("devices")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    files = {}
    for name, value in (("password", PASSWORD), ("community", COMMUNITY), ("v3auth", V3_AUTH), ("v3priv", V3_PRIV)):
        files[name] = secrets / name
        files[name].write_text(value + "\n")
        files[name].chmod(0o600)
    power_dir = tmp_path / "power"
    hosts = ["h1", "h2", "stuck"]
    bmc_ports = {h: free_udp_port() for h in hosts}
    redfish_ports = {h: free_port() for h in hosts}
    pdu_port = free_udp_port()
    cert, _ = make_self_signed(tmp_path / "certs")
    peers: list[Peer] = [
        bmc_sim(tmp_path, power_dir, files["password"], bmc_ports, off_delay=0.1, stuck_on=("stuck",)),
        pdu_sim(tmp_path, power_dir, files["community"], pdu_port, {1: "h1", 2: "h2", 3: "stuck"},
                off_delay=0.1, stuck_on=(3,), v3=("fence", files["v3auth"], files["v3priv"])),
        redfish_sim(tmp_path, power_dir, files["password"], redfish_ports, tmp_path / "certs", off_delay=0.1,
                    stuck_on=("stuck",)),
    ]
    started: list[Peer] = []
    try:
        for peer in peers:
            started.append(peer.start())
        yield Lab(tmp_path, SimPowerSwitch(power_dir), files["password"], files["community"], files["v3auth"],
                  files["v3priv"], bmc_ports, pdu_port, redfish_ports, cert)
    finally:
        for peer in started:
            peer.stop()
