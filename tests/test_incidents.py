"""Incident ids are never reused (S4), against a real NATS server: a host that is
silent whenever a heartbeat monitor starts gets a new incident in every monitor
lifetime, and both suspicions are kept by the events stream."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from hafence.contracts import Decoders, HostEvent
from hafence.heartbeat.service import run as heartbeat
from tests.conftest import eventually, running
from tests.helpers import read_stream


async def suspects(nc: NatsClient, host: str) -> list[HostEvent]:
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", f"hafence.host.{host}.suspect", Decoders.host_event)
    except Exception:
        return []


async def test_s4_a_host_silent_at_every_monitor_start_gets_a_new_incident_each_time(
    nc: NatsClient, make_config
) -> None:
    """Before: both lifetimes named it ``h1-never-seen``; the second suspicion was
    dropped by the stream's duplicate window (msg id ``suspect:h1-never-seen``)
    and the host was never fenced again."""
    config = make_config(hosts=1)
    for lifetime in (1, 2):
        async with running("heartbeat", config, heartbeat, instance=f"monitor-{lifetime}"):
            await eventually(lambda n=lifetime: _count(nc, n), timeout=15)  # type: ignore[misc]
    first, second = await suspects(nc, "h1")
    assert first.incident != second.incident
    assert all(e.incident.startswith("h1-never-seen-") for e in (first, second))


async def _count(nc: NatsClient, n: int) -> bool:
    return len(await suspects(nc, "h1")) >= n
