"""A PDU that does not answer over SNMP v1/v2c: the operator reads both causes (issue 15).

An agent drops a request carrying a wrong community without a word, so a bad
community and a dead PDU look the same on the wire. `hafence fence off` and
`hafence fence test` must say so, not just "unreachable"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hafence.fencer.drivers.apc_snmp import NO_ANSWER
from tests.peers import Lab

pytestmark = pytest.mark.timeout(60)


def config_with_wrong_community(lab: Lab, tmp_path: Path, version: str) -> Path:
    wrong = tmp_path / "wrong-community"
    wrong.write_text("public\n")
    path = tmp_path / "cluster.toml"
    # A short SNMP timeout keeps the test fast: 0.3 s and one pysnmp retry per request.
    path.write_text(f"""
[devices.pdu]
driver = "apc_snmp"
address = "127.0.0.1"
port = {lab.pdu_port}
snmp_version = "{version}"
community_file = "{wrong}"
timeout_s = 0.3
power_timeout_s = 3.0
retries = 0

[[hosts]]
name = "h1"
memory_mb = 1024
levels = [{{ devices = [{{ device = "pdu", port = "1" }}] }}]
""")
    return path


def hafence(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hafence.cli", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("version", ["1", "2c"])
def test_fence_off_and_test_name_a_wrong_community_as_a_cause_of_silence(
    devices: Lab, tmp_path: Path, version: str
) -> None:
    config = str(config_with_wrong_community(devices, tmp_path, version))
    off = hafence("fence", "off", "h1", "--config", config, "--reason", "PDU test")
    assert off.returncode == 1, off.stdout + off.stderr
    assert "no SNMP answer" in off.stdout and NO_ANSWER in off.stdout, off.stdout
    assert "public" not in off.stdout + off.stderr  # the community never appears

    checked = hafence("fence", "test", "h1", "--config", config, "--json")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["protected"] is False
    (evidence,) = report["evidence"]
    assert "no SNMP answer" in evidence["error"] and NO_ANSWER in evidence["error"], evidence
    assert devices.power.read("h1") == "on"  # nothing was switched
