"""L4 end to end: an overloaded or stalled heartbeat monitor suspects nobody,
says so on the alert subject, recovers by itself, and stops on SIGTERM.

A real nats-server, the monitor as its own process, and the fleet simulator
(another process) playing the hosts; or the test itself publishing heartbeats
that lose numbers on the way."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.config import parse_config
from hafence.contracts import Alert, Decoders, Heartbeat, encode
from hafence.lab.fleet import FleetProcess, fleet_config, provision
from hafence.lab.natsserver import NatsServer
from hafence.lab.procs import Service
from tests.conftest import eventually

pytestmark = [pytest.mark.timeout(90)]

HOSTS = 300
INTERVAL, MISSED = 0.2, 5  # window 1 s: a busy test machine may stall the fleet for half of that


@dataclass
class Seen:
    suspects: list[str] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return [a.kind for a in self.alerts]


@asynccontextmanager
async def monitored_fleet(nc: NatsClient, server: NatsServer, tmp: Path, *fleet_args: str, fleet: bool = True
                          ) -> AsyncIterator[tuple[Service, FleetProcess, Seen]]:
    """The monitor watching HOSTS hosts, played by the fleet simulator (``fleet``:
    else by the test, which then yields no fleet process)."""
    text = fleet_config(server.url, tmp, HOSTS, heartbeat_interval_s=INTERVAL, missed_heartbeats=MISSED)
    path = tmp / "cluster.toml"
    path.write_text(text)
    await provision(parse_config(text, str(path)))
    (tmp / "logs").mkdir(exist_ok=True)
    seen = Seen()

    async def on_suspect(msg: Msg) -> None:
        seen.suspects.append(msg.subject.split(".")[2])

    async def on_alert(msg: Msg) -> None:
        seen.alerts.append(Decoders.alert.decode(msg.data))

    await nc.subscribe("hafence.host.*.suspect", cb=on_suspect)
    await nc.subscribe("hafence.alert.*", cb=on_alert)
    first = await nc.subscribe(f"hafence.hb.fleet-{HOSTS:05d}", max_msgs=1)
    hosts = FleetProcess(path, tmp / "logs", "--heartbeats-only", *fleet_args) if fleet else None
    monitor: Service | None = None
    try:
        await first.next_msg(timeout=30)  # the hosts heartbeat before the monitor starts
        monitor = Service("heartbeat", ["-m", "hafence.heartbeat", "--config", str(path), "--instance", "hb"],
                          tmp / "logs", {"HAFENCE_METRICS_PORT": "0"}).start()
        kv = await nc.jetstream().key_value("HAFENCE_leases")

        async def leads() -> bool:
            try:
                return "heartbeat" in set(await kv.keys())
            except Exception:
                return False

        await eventually(leads, timeout=30)
        yield monitor, hosts, seen  # type: ignore[misc]
    finally:
        if monitor is not None:
            monitor.terminate()
        if hosts is not None:
            hosts.stop()


async def test_a_stalled_monitor_suspects_nobody_alerts_and_recovers(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    """The monitor's process is stopped for three detection windows while every
    host keeps heartbeating (a blocked event loop, a starved VM). Before the
    load guard, it woke up, ticked before reading what had queued, and declared
    live hosts suspect."""
    async with monitored_fleet(nc, nats_server, tmp_path) as (monitor, fleet, seen):
        await asyncio.sleep(2.0)  # past the start-up window, every host heard
        assert seen.suspects == [], monitor.tail(20)
        monitor.signal(signal.SIGSTOP)
        await asyncio.sleep(3 * MISSED * INTERVAL)
        monitor.signal(signal.SIGCONT)
        await eventually(lambda: "monitor_recovered" in seen.kinds(), timeout=20)
        await asyncio.sleep(2.0)  # every chance for a wrong suspicion to show
        assert seen.suspects == [], monitor.tail(20)
        [overloaded] = [a for a in seen.alerts if a.kind == "monitor_overloaded"]
        assert "event loop" in overloaded.reason and overloaded.service == "heartbeat"
        # It still does its job afterwards: a host that really stops is suspected, alone.
        fleet.fail("fleet-00007")
        await eventually(lambda: seen.suspects == ["fleet-00007"], timeout=10)


async def test_a_flooded_monitor_suspects_nobody_and_stops_on_sigterm(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Every host heartbeats a hundred times faster than configured, from two
    simulators at once: far more than one core can take (and they compete with
    the monitor for the machine's cores). The monitor suspects nobody, and SIGTERM
    still stops it while the flood goes on."""
    async with monitored_fleet(nc, nats_server, tmp_path, "--interval", str(INTERVAL / 100)) as (
            monitor, fleet, seen):
        second = FleetProcess(tmp_path / "cluster.toml", tmp_path / "logs", "--heartbeats-only", "--interval",
                              str(INTERVAL / 100))
        try:
            await asyncio.sleep(10.0)  # ten detection windows of flood
            second_alive = second.proc.poll() is None
        finally:
            second.stop()
        assert second_alive, second.tail()
        assert seen.suspects == [], monitor.tail(20)
        assert fleet.proc.poll() is None, fleet.tail()
        monitor.signal(signal.SIGTERM)  # the first flood still going
        try:
            # The rule is 2 s; the bound here is generous for a loaded test machine (make bench measures it).
            await asyncio.to_thread(monitor.proc.wait, 10)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            pytest.fail("the monitor did not stop within 10 s of SIGTERM under load:\n" + monitor.tail(20))


async def test_a_flooded_monitor_says_it_is_overloaded(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Twice the flood above, past what the monitor can take: it says so
    (monitor_overloaded) and suspects nobody. Measured on a quiet 2-core machine:
    the flood above (about 300,000 heartbeats a second) is within the monitor's
    reach (75% of a core, every heartbeat processed, none late, none lost, no
    slow consumer: no alert, rightly). Past it, nats-server first holds the
    publishers back and queues for the monitor (up to ~53 MB here): heartbeats
    arrive late (the age sign); beyond its max_pending it closes the monitor as
    a slow consumer and drops what it held (deafness, then gaps in every seq)."""
    async with monitored_fleet(nc, nats_server, tmp_path, "--interval", str(INTERVAL / 200)) as (
            monitor, _fleet, seen):
        second = FleetProcess(tmp_path / "cluster.toml", tmp_path / "logs", "--heartbeats-only", "--interval",
                              str(INTERVAL / 200))
        try:
            await eventually(lambda: "monitor_overloaded" in seen.kinds(), timeout=20)
        finally:
            second.stop()
        assert seen.suspects == [], monitor.tail(20)


async def test_heartbeats_lost_on_the_way_are_the_monitors_overload(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Every host heartbeats at its configured rate, and for a while two of every
    three of its heartbeats never reach the monitor (what nats-server drops for a
    slow consumer, or a route between NATS nodes does): what arrives is fresh and
    on time, every host is still heard within the window, and only the gaps in
    each boot's seq tell. The monitor says it cannot take what it is sent
    (L4's fifth sign), suspects nobody, and recovers once nothing is lost."""
    boots = {f"fleet-{i:05d}": uuid.uuid4().hex for i in range(1, HOSTS + 1)}
    losing = False

    async def heartbeats() -> None:
        seq = 0
        while True:
            seq += 3 if losing else 1
            for host, boot in boots.items():
                await nc.publish(f"hafence.hb.{host}", encode(Heartbeat(host=host, boot_id=boot, seq=seq,
                                                                          sent_at=time.time())))
            await nc.flush()
            await asyncio.sleep(INTERVAL)

    def lost_alerts() -> list[Alert]:
        return [a for a in seen.alerts if a.kind == "monitor_overloaded" and "heartbeats lost" in a.reason]

    sender = asyncio.create_task(heartbeats())
    try:
        async with monitored_fleet(nc, nats_server, tmp_path, fleet=False) as (monitor, _none, seen):
            await asyncio.sleep(2.0)  # past the start-up window, every host heard
            assert lost_alerts() == [] and seen.suspects == [], monitor.tail(20)
            losing = True
            await eventually(lambda: lost_alerts() != [], timeout=10)
            [alert] = lost_alerts()
            assert f"from {HOSTS} senders" in alert.reason and "cannot take what it is sent" in alert.reason
            await asyncio.sleep(2 * MISSED * INTERVAL)  # two windows of loss: long enough to suspect
            losing = False
            await eventually(lambda: seen.kinds()[-1] == "monitor_recovered", timeout=10)
            await asyncio.sleep(2 * MISSED * INTERVAL)
            assert seen.suspects == [], monitor.tail(20)
    finally:
        sender.cancel()
