"""The fencer's core on its own: events in, effects out, no NATS, no device, no clock.

A small bench plays the core's ``Call``s against in-memory ports (``MemoryJournal``,
``SoloReplicas``, a scripted power port) and keeps every effect in order, so a test
can read what came before what, or hold a call back and look at the core meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hafence.config import ClusterConfig, parse_config
from hafence.contracts import Alert, DeviceEvidence, FenceRequest, FenceResult, HostEvent
from hafence.core import (
    Ack,
    Call,
    CancelTimer,
    Delivered,
    Effect,
    InProgress,
    Nak,
    Now,
    Publish,
    Returned,
    SetTimer,
    Span,
    Started,
    Term,
    TimerFired,
)
from hafence.fencer import admission
from hafence.fencer.admission import Admission, Answer, Refuse, Run
from hafence.fencer.core import FencerCore
from hafence.fencer.live_ports import ClaimLost, HeldClaim
from hafence.fencer.locks import KvLocks, LockLost, Token
from hafence.fencer.ports import Claimed, FenceReport, MemoryJournal, Protection, SoloReplicas
from hafence.fencer.topology import Verdict
from tests.conftest import cluster_toml

PREFIX = "hafence.fence.request."


def config(tmp_path: Path, hosts: int = 2) -> ClusterConfig:
    return parse_config(cluster_toml("nats://127.0.0.1:4222", tmp_path, hosts), "test.toml")


def request(host: str, request_id: str, term: int = 1, incident: str = "") -> FenceRequest:
    return FenceRequest(request_id=request_id, incident=incident or f"inc-{request_id}", host=host, term=term,
                        requested_at=1.0)


class Power:
    """A power port: every fence confirms off; checks answer as scripted."""

    def __init__(self) -> None:
        self.fenced: list[str] = []
        self.protected: dict[str, bool] = {}

    def fence(self, request: FenceRequest) -> FenceReport:
        self.fenced.append(request.request_id)
        evidence = DeviceEvidence(device="power", driver="sim", level=1, action_sent="off", power_read="off",
                                  confirmed=True, status_reads=1, elapsed_s=0.1)
        return FenceReport(Verdict("confirmed_off", 1, "level 1 confirmed off (power)"), [evidence])

    def check(self, host: str) -> Protection:
        ok = self.protected.get(host, True)
        return Protection(host, ok, [1] if ok else [], "on", "protected" if ok else "not protected: broken", [])


class Bench:
    """The core and its ports. ``effects`` is every effect, in the order the core
    returned them; ``pending`` the calls and tagged publishes not yet returned."""

    def __init__(self, cfg: ClusterConfig, journal: MemoryJournal | None = None,
                 replicas: Any = None, power: Power | None = None) -> None:
        self.core = FencerCore(cfg)
        self.journal = journal if journal is not None else MemoryJournal()
        self.power = power or Power()
        self.ports: dict[str, Any] = {"journal": self.journal, "power": self.power,
                                      "replicas": replicas or SoloReplicas()}
        self.effects: list[Effect] = []
        self.pending: dict[str, Effect] = {}
        self.clock = 1000.0
        self.tokens = 0

    def feed(self, event: Any) -> list[Effect]:
        self.clock += 0.5
        out = self.core.handle(event, Now(self.clock, self.clock + 1e9))
        self.effects += out
        for effect in out:
            if isinstance(effect, (Call, Publish)) and effect.tag:
                self.pending[effect.tag] = effect
            elif isinstance(effect, Call):  # nobody waits for it: done at once
                getattr(self.ports[effect.port], effect.op)(*effect.args)
        return out

    def start(self) -> list[Effect]:
        return self.feed(Started())

    def deliver(self, req: FenceRequest, subject: str = "", attempt: int = 1,
                headers: dict[str, str] | None = None) -> int:
        self.tokens += 1
        self.feed(Delivered("requests", subject or PREFIX + req.host, req, self.tokens, attempt=attempt,
                            headers=headers or {}))
        return self.tokens

    def complete(self, tag: str, error: str = "") -> list[Effect]:
        """Carry out one pending effect and feed its outcome."""
        effect = self.pending.pop(tag)
        if error:
            return self.feed(Returned(tag, error=error))
        if isinstance(effect, Publish):
            return self.feed(Returned(tag))
        assert isinstance(effect, Call)
        value = getattr(self.ports[effect.port], effect.op)(*effect.args)
        return self.feed(Returned(tag, value=value))

    def settle(self, hold: tuple[str, ...] = ()) -> None:
        """Complete everything pending (oldest first) except tags starting with ``hold``."""
        while True:
            ready = [t for t in self.pending if not t.startswith(hold)]
            if not ready:
                return
            self.complete(ready[0])

    def tag_of(self, port: str, op: str) -> str:
        [tag] = [t for t, e in self.pending.items() if isinstance(e, Call) and (e.port, e.op) == (port, op)]
        return tag

    def results(self) -> list[FenceResult]:
        return [e.message for e in self.effects if isinstance(e, Publish) and isinstance(e.message, FenceResult)]

    def index(self, predicate: Any) -> int:
        return next(i for i, e in enumerate(self.effects) if predicate(e))


def is_call(port: str, op: str) -> Any:
    return lambda e: isinstance(e, Call) and (e.port, e.op) == (port, op)


def ready(tmp_path: Path, **kwargs: Any) -> Bench:
    bench = Bench(config(tmp_path), **kwargs)
    bench.start()
    bench.settle(hold=("check",))
    return bench


# -- S3 -------------------------------------------------------------------------


def test_s3_a_request_older_than_an_admitted_term_is_refused_with_the_highest_term(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    bench.deliver(request("h1", "new", term=5))
    bench.settle(hold=("check",))
    stale = bench.deliver(request("h2", "old", term=3))
    bench.settle(hold=("check",))
    refused = bench.results()[-1]
    assert (refused.request_id, refused.outcome, refused.highest_term) == ("old", "refused", 5)
    assert bench.power.fenced == ["new"]
    alert = [e for e in bench.effects if isinstance(e, Publish) and isinstance(e.message, Alert)]
    assert [(a.subject, a.message.term, a.msg_id) for a in alert] == [
        ("hafence.alert.fence_refused", 3, "fence_refused:old:t3")]
    assert Ack(stale) in bench.effects
    assert bench.journal.refusals[0].request_id == "old"


def test_s3_a_term_decided_but_not_yet_written_already_refuses_older_ones(tmp_path: Path) -> None:
    """Term 6 (h2) is admitted; its journal write has not come back when term 5 (h1)
    reaches the journal: term 5 must be refused, or it would run after term 6."""
    bench = ready(tmp_path)
    bench.deliver(request("h2", "t6", term=6))
    bench.deliver(request("h1", "t5", term=5))
    for tag in ("shared_admit:1", "claim:1", "shared_admit:2", "claim:2"):
        bench.complete(tag)
    held = "journal_admit:1"  # term 6's write, not back yet
    late = bench.pending["journal_admit:2"]
    assert isinstance(late, Call) and isinstance(late.args[1], Refuse)
    bench.complete(held)
    bench.settle(hold=("check",))
    outcomes = {r.request_id: r.outcome for r in bench.results()}
    assert outcomes == {"t6": "confirmed_off", "t5": "refused"}
    assert bench.power.fenced == ["t6"]


def test_s3_the_term_check_is_the_admission_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation plants its bug here: the core must go through ``admission.admit``."""
    monkeypatch.setattr(admission, "admit", lambda term, highest: Admission(True, max(term, highest)))
    bench = ready(tmp_path)
    bench.deliver(request("h1", "new", term=5))
    bench.deliver(request("h2", "old", term=3))
    bench.settle(hold=("check",))
    assert bench.power.fenced == ["new", "old"]  # the planted bug runs a stale term


def test_a_refusal_from_this_replicas_journal_raises_the_shared_term_before_it_is_published(
    tmp_path: Path,
) -> None:
    journal = MemoryJournal()
    journal.highest_term = 9
    bench = ready(tmp_path, journal=journal)
    bench.deliver(request("h1", "r", term=4))
    bench.settle(hold=("check",))
    raised = bench.index(is_call("replicas", "raise_term"))
    published = bench.index(lambda e: isinstance(e, Publish) and isinstance(e.message, FenceResult))
    assert bench.effects[raised].args == (9,) and raised < published  # type: ignore[union-attr]
    assert bench.results()[0].highest_term == 9


# -- S4 -------------------------------------------------------------------------


def test_s4_a_redelivered_request_is_answered_from_the_journal_not_fenced_again(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    req = request("h1", "r1")
    bench.deliver(req)
    bench.settle(hold=("check",))
    again = bench.deliver(req, attempt=2)
    bench.settle(hold=("check",))
    first, second = bench.results()
    assert second == first and first.outcome == "confirmed_off"
    assert bench.power.fenced == ["r1"]
    assert Ack(again) in bench.effects
    [publish_again] = [e for e in bench.effects if isinstance(e, Publish) and e.message is second][-1:]
    assert publish_again.msg_id == "result:r1"


def test_s4_a_request_redelivered_while_it_runs_waits_and_gets_the_recorded_result(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    req = request("h1", "r1")
    bench.deliver(req)
    bench.settle(hold=("check", "power"))
    bench.deliver(req, attempt=2)  # the ack wait ran out while the device switched
    assert not [t for t in bench.pending if t.startswith("shared_admit")]  # it waits for the host
    bench.settle(hold=("check",))
    assert bench.power.fenced == ["r1"] and len(bench.results()) == 2


def test_s4_a_request_id_reused_for_another_incident_is_refused(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    bench.deliver(request("h1", "r1", incident="a"))
    bench.settle(hold=("check",))
    bench.deliver(request("h1", "r1", incident="b"))
    bench.settle(hold=("check",))
    assert [r.outcome for r in bench.results()] == ["confirmed_off", "refused"]
    assert "can never answer another incident" in bench.results()[1].reason


# -- write-ahead ----------------------------------------------------------------


def test_the_attempt_is_written_before_the_power_call_and_the_result_before_it_is_published(
    tmp_path: Path,
) -> None:
    bench = ready(tmp_path)
    token = bench.deliver(request("h1", "r1"))
    bench.complete(bench.tag_of("replicas", "admit"))
    out = bench.complete(bench.tag_of("replicas", "claim"))
    assert [e for e in out if isinstance(e, Call)] == [
        Call("journal", "admit", (request("h1", "r1"), Run(1, 1), bench.clock + 1e9), "journal_admit:1")]
    out = bench.complete("journal_admit:1")
    assert is_call("power", "fence")(out[-1])  # only once the attempt is stored
    out = bench.complete("power:1")
    assert [e for e in out if isinstance(e, (Publish, Ack))] == []  # not before the journal has it
    assert bench.journal.rows["r1"].result is None
    bench.complete("journal_record:1")
    assert bench.journal.rows["r1"].result is not None and bench.results() == []
    out = bench.complete("shared_record:1")
    [publish] = [e for e in out if isinstance(e, Publish)]
    assert publish.msg_id == "result:r1" and Ack(token) not in bench.effects  # not acked before it is stored
    out = bench.complete(publish.tag)
    assert Ack(token) in out
    record = bench.index(is_call("journal", "record"))
    assert record < bench.index(lambda e: isinstance(e, Publish) and isinstance(e.message, FenceResult))


def test_a_journal_write_that_fails_publishes_nothing_and_asks_for_a_redelivery(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    token = bench.deliver(request("h1", "r1"), attempt=3)
    bench.complete(bench.tag_of("replicas", "admit"))
    bench.complete(bench.tag_of("replicas", "claim"))
    out = bench.complete("journal_admit:1", error="OperationalError: disk I/O error")
    assert Nak(token, 1.5) in out and not bench.power.fenced and bench.results() == []
    assert Call("replicas", "release", ("r1",)) in out


def test_a_power_call_that_fails_publishes_nothing_and_the_next_delivery_fences_again(tmp_path: Path) -> None:
    """A claim lost mid-fence (another replica may own the request now): no result;
    the redelivery reads the power state again, as the journal's second attempt."""
    bench = ready(tmp_path)
    req = request("h1", "r1")
    token = bench.deliver(req)
    bench.settle(hold=("check", "power"))
    out = bench.complete("power:1", error="ClaimLost: claim on request r1 lost")
    assert Nak(token, bench.core.ack_wait) in out and bench.results() == []
    bench.deliver(req, attempt=2)
    bench.settle(hold=("check",))
    assert bench.power.fenced == ["r1"] and bench.journal.rows["r1"].attempts == 2
    assert bench.results()[0].outcome == "confirmed_off"


# -- waiting ------------------------------------------------------------------------


def test_requests_that_wait_for_their_host_are_kept_in_progress(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    bench.deliver(request("h1", "a"))
    bench.settle(hold=("check", "power"))
    second = bench.deliver(request("h1", "b"), headers={"traceparent": "b"})
    assert SetTimer("progress:2", bench.core.ack_wait / 3) in bench.effects
    assert bench.feed(TimerFired("progress:2")) == [InProgress(second), SetTimer("progress:2", bench.core.ack_wait / 3)]
    bench.settle(hold=("check",))
    assert bench.power.fenced == ["a", "b"]
    assert CancelTimer("progress:2") in bench.effects and bench.feed(TimerFired("progress:2")) == []
    # Started when the host was freed: its calls join its own trace, not the first request's.
    [span] = [e for e in bench.effects if isinstance(e, Span)]
    assert span.parent == {"traceparent": "b"} and span.attributes["hafence.request_id"] == "b"


def test_other_hosts_do_not_wait(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    bench.deliver(request("h1", "a"))
    bench.settle(hold=("check", "power"))
    bench.deliver(request("h2", "b"))
    bench.settle(hold=("check", "power"))
    assert {t for t in bench.pending if t.startswith("power")} == {"power:1", "power:2"}


def test_deliveries_before_the_journal_is_loaded_wait_and_are_kept_in_progress(tmp_path: Path) -> None:
    bench = Bench(config(tmp_path))
    bench.start()
    token = bench.deliver(request("h1", "early"))
    assert [e for e in bench.effects if is_call("replicas", "admit")(e)] == []
    assert bench.feed(TimerFired("progress:1"))[0] == InProgress(token)
    bench.settle(hold=("check",))
    assert bench.power.fenced == ["early"] and Ack(token) in bench.effects


def test_a_request_that_arrives_before_the_load_is_decided_against_the_loaded_journal(tmp_path: Path) -> None:
    journal = MemoryJournal()
    journal.highest_term = 7
    bench = Bench(config(tmp_path), journal=journal)
    bench.start()
    bench.deliver(request("h1", "stale", term=6))
    bench.settle(hold=("check", "load"))  # however long the load takes, the request waits for it
    assert not bench.power.fenced and bench.results() == []
    bench.settle(hold=("check",))
    assert [(r.outcome, r.highest_term) for r in bench.results()] == [("refused", 7)] and not bench.power.fenced


def test_a_journal_that_cannot_be_loaded_is_loaded_again_later(tmp_path: Path) -> None:
    bench = Bench(config(tmp_path))
    bench.start()
    out = bench.complete("load", error="OperationalError: database is locked")
    assert SetTimer("load", 1.0) in out
    assert bench.feed(TimerFired("load")) == [Call("journal", "load", (), "load")]


# -- crash and restart --------------------------------------------------------------


def test_a_restarted_core_answers_as_the_one_that_crashed(tmp_path: Path) -> None:
    journal = MemoryJournal()
    before = ready(tmp_path, journal=journal)
    before.deliver(request("h1", "done", term=7))
    before.settle(hold=("check",))
    before.deliver(request("h2", "mid", term=7))
    before.settle(hold=("check", "power"))  # crashes with this one's device switching
    after = ready(tmp_path, journal=journal)
    for req in (request("h1", "done", term=7), request("h2", "old", term=6), request("h2", "mid", term=7)):
        after.deliver(req, attempt=2)
    after.settle(hold=("check",))
    done, old, mid = after.results()
    assert done == before.results()[0]  # the recorded result, not a second fence
    assert (old.outcome, old.highest_term) == ("refused", 7)  # the term survived
    assert mid.outcome == "confirmed_off" and journal.rows["mid"].attempts == 2
    assert after.power.fenced == ["mid"]


# -- the subject and the configuration -----------------------------------------------


def test_a_request_on_another_hosts_subject_is_dead_lettered(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    token = bench.deliver(request("h1", "r"), subject=PREFIX + "h2")
    assert bench.effects[-1] == Term(token, "request for host 'h1' on subject hafence.fence.request.h2")
    assert not bench.power.fenced


def test_a_host_the_fencer_does_not_know_gets_a_failed_result(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    token = bench.deliver(request("h9", "r"))
    bench.settle(hold=("check",))
    [result] = bench.results()
    assert result.outcome == "failed" and "not in the fencer's configuration" in result.reason
    assert Ack(token) in bench.effects and bench.journal.writes == 0


def test_a_result_that_cannot_be_published_is_not_acked(tmp_path: Path) -> None:
    bench = ready(tmp_path)
    token = bench.deliver(request("h1", "r1"))
    bench.settle(hold=("check", "publish"))
    out = bench.complete("publish:1", error="error: no response from stream")
    assert Nak(token, 0.5) in out and Ack(token) not in bench.effects


# -- across replicas ----------------------------------------------------------------


class Replicas(SoloReplicas):
    def __init__(self, admit: Any = None, claim: Any = None) -> None:
        self.verdict, self.claim_answer, self.calls = admit, claim, []

    def admit(self, request: FenceRequest) -> Any:
        self.calls.append("admit")
        return self.verdict or Run(0, 0)

    def claim(self, request: FenceRequest, highest: int) -> Any:
        self.calls.append("claim")
        return self.claim_answer or Claimed(7)

    def record(self, request: FenceRequest, result: FenceResult) -> None:
        self.calls.append("record")

    def release(self, request_id: str) -> None:
        self.calls.append("release")


def recorded(term: int = 2) -> FenceResult:
    return FenceResult(request_id="r", incident="inc-r", host="h1", term=term, outcome="confirmed_off",
                       started_at=1.0, finished_at=2.0)


def test_replicas_are_asked_in_order_and_the_claim_is_released_after_the_record(tmp_path: Path) -> None:
    replicas = Replicas(admit=Run(0, 4))
    bench = ready(tmp_path, replicas=replicas)
    bench.deliver(request("h1", "r", term=2))
    bench.settle(hold=("check",))
    assert replicas.calls == ["admit", "claim", "record", "release"]
    assert bench.results()[0].highest_term == 4  # the shared term, above this journal's


@pytest.mark.parametrize("verdict", [Refuse("stale leader term 2", 5), Answer(recorded(), 5)])
def test_what_another_replica_decided_is_answered_without_this_journal(tmp_path: Path, verdict: Any) -> None:
    replicas = Replicas(admit=verdict)
    bench = ready(tmp_path, replicas=replicas)
    bench.deliver(request("h1", "r", term=2))
    bench.settle(hold=("check",))
    assert bench.journal.writes == 0 and not bench.power.fenced and replicas.calls == ["admit"]
    assert bench.results()[0].outcome == ("refused" if isinstance(verdict, Refuse) else "confirmed_off")


def test_a_result_another_replica_recorded_while_this_one_waited_for_the_claim_answers(tmp_path: Path) -> None:
    replicas = Replicas(claim=Answer(recorded(), 2))
    bench = ready(tmp_path, replicas=replicas)
    bench.deliver(request("h1", "r", term=2))
    bench.settle(hold=("check",))
    assert bench.results() == [recorded()] and not bench.power.fenced and "release" not in replicas.calls


# -- health -----------------------------------------------------------------------------


def test_protection_is_announced_only_when_it_changes(tmp_path: Path) -> None:
    bench = Bench(config(tmp_path))
    bench.start()
    bench.settle()
    assert SetTimer("health", bench.core.health_interval) in bench.effects

    def events() -> list[tuple[str, str]]:
        return [(e.message.host, e.message.kind) for e in bench.effects
                if isinstance(e, Publish) and isinstance(e.message, HostEvent)]

    assert events() == [("h1", "protected"), ("h2", "protected")]
    bench.feed(TimerFired("health"))
    bench.settle()
    assert len(events()) == 2  # nothing changed: nothing said
    bench.power.protected["h2"] = False
    bench.feed(TimerFired("health"))
    bench.settle()
    assert events()[2:] == [("h2", "not_protected")]
    assert [e.subject for e in bench.effects if isinstance(e, Publish)][-1] == "hafence.host.h2.not_protected"


# -- the production replicas binding: a fence stops when its claim is lost ----------------


class FlakyLocks:
    """``KvLocks`` whose hold ends with ``LockLost`` after ``lose_after`` seconds."""

    def __init__(self, lose_after: float) -> None:
        self.lose_after = lose_after
        self.released = False

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    @contextlib.asynccontextmanager
    async def hold(self, key: str, what: str, token: Token) -> AsyncIterator[Token]:
        try:
            async with asyncio.timeout(self.lose_after):
                yield token
        except TimeoutError:
            raise LockLost(f"lock on {what} lost: not renewed") from None
        finally:
            self.released = True


async def test_a_fence_running_under_a_claim_that_is_lost_is_stopped_and_reports_it() -> None:
    locks = FlakyLocks(lose_after=0.05)
    stopped = asyncio.Event()

    async def slow_fence() -> FenceReport:
        try:
            await asyncio.sleep(10)
        finally:
            stopped.set()
        raise AssertionError("not reached")

    async with asyncio.TaskGroup() as tg:
        token = Token("req.r1", "request r1", 5, 5, locks.now() + 10)
        claim = HeldClaim(locks, token, tg)  # type: ignore[arg-type]
        with pytest.raises(ClaimLost, match="lock on request r1 lost"):
            await claim.run(slow_fence())
        assert stopped.is_set() and locks.released


async def test_a_fence_that_ends_past_its_claims_validity_is_not_reported() -> None:
    locks = FlakyLocks(lose_after=10)

    async def quick_fence() -> FenceReport:
        return Power().fence(request("h1", "r1"))

    async with asyncio.TaskGroup() as tg:
        token = Token("req.r1", "request r1", 5, 5, locks.now() - 0.001)  # a pause ate the validity
        claim = HeldClaim(locks, token, tg)  # type: ignore[arg-type]
        with pytest.raises(ClaimLost, match="expired"):
            await claim.run(quick_fence())
        claim.release()


class SwallowingKv:
    """A KV whose update loses a cancellation that comes while it is in flight, as
    ``asyncio.wait_for`` does on Python < 3.12 when the reply arrives at once."""

    def __init__(self) -> None:
        self.revision = 1
        self.swallowed = 0
        self.in_flight = asyncio.Event()

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.in_flight.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.swallowed += 1
        self.revision += 1
        return self.revision

    async def delete(self, key: str, last: int) -> None:
        return None


async def test_a_lock_whose_renewal_loses_its_cancellation_is_still_released() -> None:
    kv = SwallowingKv()
    locks = KvLocks(kv, "me", ttl=0.2)  # type: ignore[arg-type]
    token = Token("dev.x", "device x", 1, 1, locks.now() + locks.validity)
    async with asyncio.timeout(5):  # before: the renewer renewed on and the block never ended
        async with locks.hold(token.key, token.what, token):
            await kv.in_flight.wait()  # the block ends while a renewal is in flight
    assert kv.swallowed >= 1
