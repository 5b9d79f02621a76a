"""Fencing topologies on real protocols, with the faults that must never turn
into a false ``confirmed_off`` (S2), and a scan of everything a fencing run
writes for the credentials it used."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from hafence.config import ClusterConfig, TelemetrySection, parse_config
from hafence.contracts import Decoders
from hafence.fencer.executor import Executor
from hafence.fencer.service import run as fencer
from hafence.lab.peers import free_udp_port
from hafence.telemetry import JsonLinesSpanExporter, setup_tracing
from tests.conftest import eventually, running
from tests.helpers import fence_request, publish_request, read_stream
from tests.peers import SECRETS, Lab

pytestmark = pytest.mark.timeout(90)


def topology(lab: Lab, url: str = "nats://127.0.0.1:1", state: Path | None = None) -> ClusterConfig:
    pw, comm = lab.password_file, lab.community_file
    text = f"""
[nats]
url = "{url}"
[store]
dir = "{state or lab.dir / 'state'}"
[timings]
fence_ack_wait_s = 5.0

[devices.bmc-h1]
driver = "ipmi"
address = "127.0.0.1"
port = {lab.bmc_ports["h1"]}
username = "admin"
password_file = "{pw}"
power_timeout_s = 3.0

[devices.bmc-stuck]
driver = "ipmi"
address = "127.0.0.1"
port = {lab.bmc_ports["stuck"]}
username = "admin"
password_file = "{pw}"
power_timeout_s = 3.0
retries = 0

[devices.bmc-wrong-password]
driver = "ipmi"
address = "127.0.0.1"
port = {lab.bmc_ports["h2"]}
username = "admin"
password_env = "HAFENCE_TEST_WRONG_PW"
power_timeout_s = 3.0
retries = 3

[devices.bmc-silent]
driver = "ipmi"
address = "127.0.0.1"
port = {free_udp_port()}
username = "admin"
password_file = "{pw}"
timeout_s = 0.5
power_timeout_s = 1.0
retries = 0

[devices.pdu-a]
driver = "apc_snmp"
address = "127.0.0.1"
port = {lab.pdu_port}
snmp_version = "2c"
community_file = "{comm}"
power_timeout_s = 2.0

[devices.pdu-b]
driver = "apc_snmp"
address = "127.0.0.1"
port = {lab.pdu_port}
snmp_version = "2c"
community_file = "{comm}"
power_timeout_s = 3.0
retries = 0

[devices.rf-h2]
driver = "redfish"
address = "127.0.0.1"
port = {lab.redfish_ports["h2"]}
username = "admin"
password_file = "{pw}"
ca_file = "{lab.cert}"
power_timeout_s = 3.0

[devices.rf-stuck]
driver = "redfish"
address = "127.0.0.1"
port = {lab.redfish_ports["stuck"]}
username = "admin"
password_file = "{pw}"
ca_file = "{lab.cert}"
power_timeout_s = 1.0
retries = 0

[[hosts]]
name = "ipmi-ok"
memory_mb = 1
levels = [{{ devices = [{{ device = "bmc-h1" }}] }}]

[[hosts]]
name = "wrong-password"
memory_mb = 1
levels = [{{ devices = [{{ device = "bmc-wrong-password" }}] }}]

[[hosts]]
name = "silent"
memory_mb = 1
levels = [{{ devices = [{{ device = "bmc-silent" }}] }}]

[[hosts]]
name = "stuck-on"
memory_mb = 1
levels = [{{ devices = [{{ device = "bmc-stuck" }}] }}]

[[hosts]]
name = "two-levels"
memory_mb = 1
levels = [{{ devices = [{{ device = "rf-stuck" }}] }}, {{ devices = [{{ device = "pdu-a", port = "1" }}] }}]

[[hosts]]
name = "psu-pair-one-stuck"
memory_mb = 1
levels = [{{ devices = [{{ device = "pdu-a", port = "2" }}, {{ device = "pdu-b", port = "3" }}] }}]

[[hosts]]
name = "redfish"
memory_mb = 1
levels = [{{ devices = [{{ device = "rf-h2" }}] }}]
"""
    return parse_config(text, "faults.toml")


@pytest.fixture(autouse=True)
def wrong_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAFENCE_TEST_WRONG_PW", "Not-the-r1ght-one")


async def fence(lab: Lab, host: str) -> tuple[str, int | None, str, list]:  # type: ignore[type-arg]
    config = topology(lab)
    for target in ("h1", "h2", "stuck"):
        lab.power.switch(target, "on")
    executor = Executor(config)
    try:
        report = await executor.fence(config.host(host), "off")
    finally:
        await executor.close()
    return report.verdict.outcome, report.verdict.level, report.verdict.reason, report.evidence


async def test_ipmi_level_confirms_off_from_a_status_read(devices: Lab) -> None:
    outcome, level, _, evidence = await fence(devices, "ipmi-ok")
    assert (outcome, level) == ("confirmed_off", 1)
    assert evidence[0].power_read == "off" and evidence[0].status_reads >= 1
    assert devices.power.read("h1") == "off"


async def test_wrong_password_fails_without_retrying(devices: Lab) -> None:
    outcome, _, reason, evidence = await fence(devices, "wrong-password")
    assert outcome == "failed"
    assert "authentication failed" in reason
    assert evidence[0].power_read == "unknown" and evidence[0].status_reads == 0
    assert devices.power.read("h2") == "on"


async def test_a_device_that_never_answers_is_never_confirmed(devices: Lab) -> None:
    outcome, _, reason, evidence = await fence(devices, "silent")
    assert outcome == "failed" and "unreachable" in reason
    assert evidence[0].power_read == "unknown"


async def test_a_device_that_answers_on_forever_is_never_confirmed(devices: Lab) -> None:
    outcome, _, reason, evidence = await fence(devices, "stuck-on")
    assert outcome == "failed" and "power still on after 3s" in reason
    assert evidence[0].status_reads > 1 and evidence[0].power_read == "on"


async def test_the_second_level_succeeds_after_the_first_fails(devices: Lab) -> None:
    outcome, level, _, evidence = await fence(devices, "two-levels")
    assert (outcome, level) == ("confirmed_off", 2)
    assert [(e.device, e.confirmed) for e in evidence] == [("rf-stuck", False), ("pdu-a", True)]
    assert devices.power.read("h1") == "off"


async def test_a_psu_pair_with_one_outlet_stuck_is_not_fenced(devices: Lab) -> None:
    outcome, _, reason, evidence = await fence(devices, "psu-pair-one-stuck")
    assert outcome == "failed"
    assert {(e.device, e.power_read) for e in evidence} == {("pdu-a", "off"), ("pdu-b", "on")}
    assert "pdu-b" in reason


async def test_redfish_level_confirms_off(devices: Lab) -> None:
    outcome, level, _, _ = await fence(devices, "redfish")
    assert (outcome, level) == ("confirmed_off", 1)
    assert devices.power.read("h2") == "off"


def ipmi_workers() -> list[int]:
    """Our own children that are IPMI worker processes (alive, or dead but not reaped)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            ppid = int(next(line.split()[1] for line in (proc / "status").read_text().splitlines()
                            if line.startswith("PPid:")))
        except (OSError, StopIteration, ValueError):
            continue
        if ppid == os.getpid() and b"hafence.fencer.drivers.ipmi_worker" in cmdline:
            found.append(int(proc.name))
    return found


async def test_a_failed_health_check_closes_its_ipmi_driver_and_no_worker_survives(devices: Lab) -> None:
    """Before: a failed check dropped the driver without closing it; its worker
    process was still counted as used, so even closing the executor left it running."""
    config = topology(devices)
    executor = Executor(config)
    try:
        for _ in range(3):
            verdict = await executor.check_host(config.host("wrong-password"))
            assert not verdict.protected
        assert (await executor.check_host(config.host("ipmi-ok"))).protected
        assert ipmi_workers(), "the checks ran through worker processes"
    finally:
        await executor.close()
    assert ipmi_workers() == []


async def test_no_credential_appears_in_logs_spans_events_or_journal(
    devices: Lab, nats_server, nc: NatsClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Fence every host (successes and every failure) through the fencer service,
    then scan all it wrote for the passwords, communities and keys it used."""
    caplog.set_level(logging.DEBUG)
    spans = tmp_path / "spans.jsonl"
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    setup_tracing("fencer", TelemetrySection())  # installs the SDK provider unless one is already set
    provider = trace.get_tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(str(spans))))  # type: ignore[attr-defined]
    config = topology(devices, nats_server.url, tmp_path / "state")
    hosts = [h.name for h in config.hosts]
    async with running("fencer", config, fencer):
        await eventually(lambda: _consumer(nc))
        for i, host in enumerate(hosts):
            await publish_request(nc, fence_request(host, f"scan-{i}"))
        await eventually(lambda: _results(nc, len(hosts)), timeout=60)
    results = await read_stream(nc, "HAFENCE_EVENTS", "hafence.fence.result.*", Decoders.fence_result)
    assert {r.outcome for r in results} == {"confirmed_off", "failed"}
    written = [
        caplog.text,
        json.dumps([str(r) for r in results]),
        spans.read_text() if spans.exists() else "",
        *(p.read_bytes().decode(errors="replace") for p in (tmp_path / "state").glob("*")),
        devices.dir.joinpath("bmcsim.log").read_text(),
    ]
    everything = "\n".join(written)
    # The scan is only worth something if there was something to scan.
    assert "fence finished" in caplog.text, sorted({r.name for r in caplog.records})
    outcomes = {r.host: r.outcome for r in results}
    reasons = {r.host: r.reason for r in results}
    assert outcomes["wrong-password"] == "failed" and outcomes["ipmi-ok"] == "confirmed_off", reasons
    assert '"name": "power off bmc-h1"' in everything
    assert "Not-the-r1ght-one" not in everything
    for secret in SECRETS:
        assert secret not in everything


async def _consumer(nc: NatsClient) -> bool:
    try:
        await nc.jetstream().consumer_info("HAFENCE_FENCE_REQUESTS", "fencer")
        return True
    except Exception:
        return False


async def _results(nc: NatsClient, n: int) -> bool:
    return len(await read_stream(nc, "HAFENCE_EVENTS", "hafence.fence.result.*", Decoders.fence_result)) >= n
