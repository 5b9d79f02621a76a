"""S3 and S4 under concurrency, against a real NATS server: redeliveries,
re-issues and terms interleaved on purpose. A sim device that counts its power
operations (and holds them until the test lets go) shows whether a host was
power-cycled twice."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient

from hafence.contracts import Decoders, FenceResult
from hafence.fencer.admission import Answer, Refuse, Run, Seen, admit_request
from hafence.fencer.drivers.sim import SimDriver
from hafence.fencer.journal import FenceJournal
from hafence.fencer.service import run as fencer
from hafence.lab.power import SimPowerSwitch
from tests.conftest import eventually, running
from tests.helpers import fence_request, publish_request, read_stream


async def results(nc: NatsClient) -> list[FenceResult]:
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", "hafence.fence.result.*", Decoders.fence_result)
    except Exception:
        return []


async def consumer_ready(nc: NatsClient) -> bool:
    try:
        await nc.jetstream().consumer_info("HAFENCE_FENCE_REQUESTS", "fencer")
        return True
    except Exception:
        return False


class CountingPower:
    """Counts ``power_off`` per port; holds each command until ``gate`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offs: Counter[str] = Counter()
        self.gate = asyncio.Event()
        self.gate.set()
        original = SimDriver.power_off

        async def power_off(driver: SimDriver) -> None:
            self.offs[driver.port] += 1
            await self.gate.wait()
            await original(driver)

        monkeypatch.setattr(SimDriver, "power_off", power_off)


async def test_s4_a_request_reissued_while_it_runs_gets_the_recorded_result(
    nc: NatsClient, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the journal was checked before the host's lock was taken; the
    re-issue found no result yet, queued behind the running fence, then ran it
    again: two power-offs of one host for one request id."""
    power = CountingPower(monkeypatch)
    power.gate.clear()
    async with running("fencer", make_config(), fencer):
        await eventually(lambda: consumer_ready(nc))
        await publish_request(nc, fence_request("h1", "r1", term=1), msg_id="r1:t1")
        await eventually(lambda: power.offs["h1"] == 1)
        # A new arbiter leader re-issues the request in flight under its own term.
        await publish_request(nc, fence_request("h1", "r1", term=2), msg_id="r1:t2")
        await eventually(lambda: _ack_pending(nc, 2))  # both are in the fencer's hands
        power.gate.set()
        await eventually(lambda: _requests_done(nc, 2))
    assert power.offs["h1"] == 1
    [result] = await results(nc)  # the answer is the recorded result, under the same msg id
    assert (result.request_id, result.outcome, result.term) == ("r1", "confirmed_off", 1)


async def test_s4_a_request_waiting_for_the_host_lock_is_kept_in_progress(
    nc: NatsClient, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request queued behind another fence of its host is told to JetStream as
    in progress, so it is not redelivered to yet another handler (ack wait 1s)."""
    power = CountingPower(monkeypatch)
    power.gate.clear()
    config = make_config()
    config = msgspec.structs.replace(config, timings=msgspec.structs.replace(config.timings, fence_ack_wait_s=1.0))
    async with running("fencer", config, fencer):
        await eventually(lambda: consumer_ready(nc))
        await publish_request(nc, fence_request("h1", "first", term=1))
        await eventually(lambda: power.offs["h1"] == 1)
        await publish_request(nc, fence_request("h1", "second", term=1))
        await asyncio.sleep(2.5)  # give a redelivery every chance (2.5 ack waits)
        info = await nc.jetstream().consumer_info("HAFENCE_FENCE_REQUESTS", "fencer")
        assert info.num_redelivered == 0
        power.gate.set()
        await eventually(lambda: _requests_done(nc, 2))
    assert power.offs["h1"] == 2  # two request ids: two fences, one after the other


async def test_s3_a_term_is_never_admitted_after_a_newer_one_also_when_checks_interleave(
    nc: NatsClient, make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Term 5 (host h1) reads the highest term, and is held up before it acts on
    what it read; term 6 (host h2) comes in meanwhile. Before: the check and the
    raise were separate awaits, so term 6 was admitted and then term 5 was, with
    the value it had read before: the journal admitted 6, then 5."""
    original = FenceJournal.highest_term
    calls = 0

    async def slow_first_read(journal: FenceJournal) -> int:
        nonlocal calls
        calls += 1
        value = await original(journal)
        if calls == 1:
            await asyncio.sleep(0.5)
        return value

    monkeypatch.setattr(FenceJournal, "highest_term", slow_first_read)
    async with running("fencer", make_config(), fencer):
        await eventually(lambda: consumer_ready(nc))
        await publish_request(nc, fence_request("h1", "term5", term=5))
        await publish_request(nc, fence_request("h2", "term6", term=6))
        await eventually(lambda: _count(nc, 2))
    with sqlite3.connect(tmp_path / "state" / "fencer.db") as db:
        admitted = [term for (term,) in db.execute("SELECT term FROM requests ORDER BY rowid")]
    assert admitted == sorted(admitted), f"admitted in this order: {admitted}"
    ran = {r.request_id: r.outcome for r in await results(nc)}
    assert ran["term6"] == "confirmed_off"


async def test_s4_a_journal_entry_never_answers_another_incident(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    """Before: the journal was looked up by request id alone; a request of a new
    incident that reused an id got the old incident's ``confirmed_off`` while the
    host was powered on."""
    power = SimPowerSwitch(tmp_path / "power")
    async with running("fencer", make_config(), fencer):
        await eventually(lambda: consumer_ready(nc))
        await publish_request(nc, fence_request("h1", "fence-h1-x", incident="incident-a"))
        await eventually(lambda: _count(nc, 1))
        power.switch("h1", "on")  # the host came back
        await publish_request(nc, fence_request("h1", "fence-h1-x", incident="incident-b"), msg_id="again")
        await eventually(lambda: _count(nc, 2))
        await eventually(lambda: _alerts(nc, 1))
    first, second = await results(nc)
    assert (first.incident, first.outcome) == ("incident-a", "confirmed_off")
    assert (second.incident, second.outcome) == ("incident-b", "refused")
    assert "can never answer another incident" in second.reason and second.highest_term == 1
    assert power.read("h1") == "on"


def test_admission_decides_s3_before_s4_and_matches_the_whole_request() -> None:
    done = FenceResult(request_id="r", incident="i", host="h", term=3, outcome="confirmed_off",
                       started_at=0.0, finished_at=1.0)
    seen = Seen(incident="i", host="h", attempts=1, result=done)
    assert admit_request("r", "i", "h", 3, 3, seen) == Answer(done, 3)
    assert isinstance(admit_request("r", "i", "h", 2, 3, seen), Refuse)  # stale, even though it ran
    assert isinstance(admit_request("r", "j", "h", 3, 3, seen), Refuse)  # same id, another incident
    assert isinstance(admit_request("r", "i", "g", 3, 3, seen), Refuse)  # same id, another host
    unfinished = Seen(incident="i", host="h", attempts=1, result=None)
    assert admit_request("r", "i", "h", 4, 3, unfinished) == Run(2, 4)
    assert admit_request("new", "k", "h", 4, 3, None) == Run(1, 4)


async def _count(nc: NatsClient, n: int) -> bool:
    return len(await results(nc)) >= n


async def _alerts(nc: NatsClient, n: int) -> bool:
    try:
        alerts = await read_stream(nc, "HAFENCE_EVENTS", "hafence.alert.fence_refused", Decoders.alert)
    except Exception:
        return False
    return len(alerts) >= n


async def _ack_pending(nc: NatsClient, n: int) -> bool:
    info = await nc.jetstream().consumer_info("HAFENCE_FENCE_REQUESTS", "fencer")
    return info.num_ack_pending >= n


async def _requests_done(nc: NatsClient, n: int) -> bool:
    info = await nc.jetstream().stream_info("HAFENCE_FENCE_REQUESTS")
    return info.state.messages == 0 and info.state.last_seq >= n
