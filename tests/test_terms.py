"""Terms never go back, and a fence never hangs, against a real NATS server:
the arbiter and the fencer in-process, the lease bucket recreated, the fencer
remembering a term nobody else does, the fencer gone."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
from nats.aio.client import Client as NatsClient

from hafence.arbiter.service import run as arbiter
from hafence.contracts import Alert, Decoders, FenceResult, HostEvent, encode
from hafence.fencer.journal import FenceJournal
from hafence.fencer.service import run as fencer
from tests.conftest import eventually, running
from tests.helpers import read_stream


async def stored(nc: NatsClient, subject: str, decoder: msgspec.json.Decoder) -> list:  # type: ignore[type-arg]
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", subject, decoder)
    except Exception:
        return []


async def results(nc: NatsClient, host: str = "*") -> list[FenceResult]:
    return await stored(nc, f"hafence.fence.result.{host}", Decoders.fence_result)


async def suspect(nc: NatsClient, host: str, incident: str) -> None:
    event = HostEvent(host=host, kind="suspect", at=time.time(), incident=incident, reason="test: silent")
    await nc.jetstream().publish(f"hafence.host.{host}.suspect", encode(event),
                                 headers={"Nats-Msg-Id": f"suspect:{incident}"})


async def test_s3_a_refused_arbiter_raises_its_term_and_the_fence_completes(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    """The fencer once admitted term 10000, which no event and no lease records any
    more (the bucket and the stream's history were lost). Before: every request was
    refused, its re-issue carried the same message id and was dropped as a
    duplicate, and the host stayed 'fencing' for ever, silently."""
    journal = await FenceJournal.open(str(tmp_path / "state" / "fencer.db"))
    await journal.db.execute("UPDATE highest_term SET term = 10000 WHERE id = 1")
    await journal.db.commit()
    await journal.close()
    config = make_config()
    async with running("fencer", config, fencer), running("arbiter", config, arbiter):
        await suspect(nc, "h1", "h1-boot-7")
        await eventually(lambda: _confirmed(nc, "h1"), timeout=20)
    refused, confirmed = await results(nc, "h1")
    assert refused.outcome == "refused" and refused.highest_term == 10000 and refused.term < 10000
    assert confirmed.outcome == "confirmed_off" and confirmed.term > 10000
    assert confirmed.request_id != refused.request_id and confirmed.incident == refused.incident == "h1-boot-7"
    [alert] = await stored(nc, "hafence.alert.fence_refused", Decoders.alert)
    assert isinstance(alert, Alert) and alert.host == "h1" and "stale leader term" in alert.reason


async def test_a_fence_with_no_result_within_its_deadline_fails_with_an_alert(nc: NatsClient, make_config) -> None:
    """No fencer at all. Before: the host stayed 'fencing' for ever, no fence_failed, no alert."""
    config = make_config()
    config = msgspec.structs.replace(config, timings=msgspec.structs.replace(config.timings, fence_deadline_s=1.0))
    async with running("arbiter", config, arbiter):
        await suspect(nc, "h2", "h2-boot-3")
        await eventually(lambda: _failed(nc, "h2"), timeout=20)
        await eventually(lambda: _deadline_alert(nc), timeout=5)
    [failed] = await stored(nc, "hafence.host.h2.fence_failed", Decoders.host_event)
    assert failed.alert and failed.request_id == "fence-h2-boot-3" and "within 1s" in failed.reason
    [alert] = await stored(nc, "hafence.alert.fence_deadline", Decoders.alert)
    assert alert.host == "h2" and alert.service == "arbiter"


async def _confirmed(nc: NatsClient, host: str) -> bool:
    return any(r.outcome == "confirmed_off" for r in await results(nc, host))


async def _failed(nc: NatsClient, host: str) -> bool:
    return bool(await stored(nc, f"hafence.host.{host}.fence_failed", Decoders.host_event))


async def _deadline_alert(nc: NatsClient) -> bool:
    return bool(await stored(nc, "hafence.alert.fence_deadline", Decoders.alert))
