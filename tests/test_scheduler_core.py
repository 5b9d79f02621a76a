"""The scheduler's core on its own: events in, effects out, no NATS, no clock,
the start history in memory. Each test names the rule it proves and fails when
that rule is broken (S1's release, the record before the command, the retry and
move rules of a start, a takeover's use of its predecessor's starts)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

import hafence.scheduler.placement as scheduler_placement
import hafence.scheduler.state as scheduler_state
from hafence.config import parse_config
from hafence.contracts import (
    AgentReply,
    FenceResult,
    HostEvent,
    Inventory,
    Message,
    Placements,
    VmEvent,
    VmInfo,
    VmSpec,
    VmStart,
    encode,
)
from hafence.core import (
    Call,
    CaughtUp,
    Delivered,
    Effect,
    Event,
    LeaseChanged,
    Now,
    Publish,
    Request,
    Returned,
    Started,
    TimerFired,
)
from hafence.scheduler.core import COMMANDS_IN_FLIGHT, TICK, SchedulerCore
from hafence.scheduler.ports import MemoryStartHistory
from hafence.sim.subjects import subject_matches
from tests.conftest import cluster_toml


class Harness:
    """Drives the core as a driver would: store calls answered at once (after the
    effects of the same event), requests kept until a test answers them."""

    def __init__(self, tmp_path: Path, store: MemoryStartHistory | None = None) -> None:
        config = parse_config(cluster_toml("nats://127.0.0.1:4222", tmp_path, 3), "test.toml")
        self.core = SchedulerCore(config)
        self.store = store or MemoryStartHistory()
        self.mono, self.wall = 100.0, 1_700_000_000.0
        # Everything the core did, in order: ("record", rows) / ("request", target, vm) / ("publish", subject).
        self.trace: list[tuple[str, object, ...]] = []  # type: ignore[misc]
        self.open: dict[str, Request] = {}
        self.published: list[Publish] = []
        self.queue: deque[Event] = deque()
        # While set, records wait in ``held`` (a slow disk) until ``release_store``.
        self.hold_store = False
        # The stream as far as placement records go: each subject's last sequence (another
        # process may have stored one the core has not read yet), the message ids stored
        # and where (a duplicate is acked with its first copy's sequence, not checked),
        # and whether a stored one is read back.
        self.seq = 0
        self.last_seq: dict[str, int] = {}
        self.msg_ids: dict[str, int] = {}
        self.echo = True
        self.held: list[Call] = []
        self.feed(Started())

    def feed(self, event: Event) -> None:
        self.queue.append(event)
        while self.queue:
            self._carry_out(self.core.handle(self.queue.popleft(), Now(self.mono, self.wall)))

    def _carry_out(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Call(port="store", op="record") if self.hold_store:
                    self.held.append(effect)
                case Call(port="store", op=op, args=args, tag=tag):
                    if op == "record":
                        self.trace.append(("record", [row[0] for row in args[0]], args[1]))
                    try:
                        value = getattr(self.store, op)(*args)
                    except OSError as err:
                        if tag:
                            self.queue.append(Returned(tag, error=f"OSError: {err}"))
                        continue
                    if tag:
                        self.queue.append(Returned(tag, value=value))
                case Request(subject=subject, message=message, tag=tag):
                    self.open[tag] = effect
                    vm = message.vm.name if isinstance(message, VmStart) else message.vm  # type: ignore[union-attr]
                    self.trace.append(("request", subject.split(".")[2], vm))
                case Publish(subject=subject, tag=tag, expect_last_subject_seq=expect, msg_id=msg_id,
                             expect_last_of=of, message=message):
                    self.published.append(effect)
                    stored = self.msg_ids.get(msg_id) if msg_id else None
                    if stored is None and expect is not None and self.last_of(of or subject) != expect:
                        self.trace.append(("conflict", of or subject))
                        self.queue.append(Returned(tag, error=f"conflict: wrong last sequence for {of or subject}"))
                        continue
                    self.trace.append(("publish", subject))
                    new = stored is None and isinstance(message, Placements)
                    if new:
                        self.seq += 1
                        self.last_seq[subject] = stored = self.seq
                        self.msg_ids[msg_id] = self.seq
                        self.trace.extend(("placed", p.vm) for p in message.placed)  # type: ignore[union-attr]
                    if tag:
                        self.queue.append(Returned(tag, value=stored))  # the ack, then the replay reads it
                    if new and self.echo:
                        self.queue.append(Delivered("events", subject, message, sequence=self.seq))

    def last_of(self, subjects: str) -> int:
        return max((seq for subject, seq in self.last_seq.items() if subject_matches(subjects, subject)), default=0)

    def stored_elsewhere(self, placed: list[VmEvent], seq: int, read: bool = True) -> None:
        """Another scheduler's placement record, stored at ``seq``; read back here too if ``read``."""
        subject = f"hafence.vm.placements.record.other-{seq}"
        self.seq = max(self.seq, seq)
        self.last_seq[subject] = seq
        self.msg_ids[f"other-{seq}"] = seq
        if read:
            self.feed(Delivered("events", subject, Placements(at=self.wall, placed=placed), sequence=seq))

    def release_store(self) -> None:
        self.hold_store = False
        held, self.held = self.held, []
        self._carry_out(list(held))
        self.feed(TimerFired("none"))  # let what the store answered through

    # -- the world as the core hears of it --------------------------------------------

    def deliver(self, message: Message) -> None:
        self.feed(Delivered("events", "", message))

    def inventory(self, host: str, vms: list[str], boot: str = "", memory_mb: int = 16384, vcpus: int = 16) -> None:
        self.deliver(Inventory(host=host, boot_id=boot or f"{host}-b1", memory_mb=memory_mb, vcpus=vcpus,
                               sent_at=self.wall,
                               vms=[VmInfo(spec=VmSpec(name=n, memory_mb=1024, ha=True), state="running")
                                    for n in vms]))

    def lead(self) -> None:
        self.feed(CaughtUp("events"))
        self.feed(LeaseChanged(held=True, term=1, valid_until=self.mono + 1000))

    def suspect(self, host: str, incident: str, boot: str) -> None:
        self.deliver(HostEvent(host=host, kind="suspect", at=self.wall, incident=incident, boot_id=boot))

    def fence(self, host: str, incident: str, boot: str, outcome: str = "confirmed_off") -> None:
        self.deliver(FenceResult(request_id=f"fence-{incident}", incident=incident, host=host, term=1,
                                 outcome=outcome, started_at=self.wall, finished_at=self.wall,  # type: ignore[arg-type]
                                 boot_id=boot))

    def tick(self, seconds: float = 1.0) -> None:
        self.mono += seconds
        self.wall += seconds
        self.feed(TimerFired(TICK))

    def starts(self) -> list[tuple[str, str]]:
        """(target, vm) of every VmStart sent, in order."""
        return [(t[1], t[2]) for t in self.trace if t[0] == "request"]

    def answer(self, vm: str, error: str = "", ok: bool = True) -> None:
        [tag] = [tag for tag, r in self.open.items() if isinstance(r.message, VmStart) and r.message.vm.name == vm]
        request = self.open.pop(tag)
        host = request.subject.split(".")[2]
        if error:
            self.feed(Returned(tag, error=error))
        else:
            self.feed(Returned(tag, value=encode(AgentReply(host=host, vm=vm, ok=ok, state="running",
                                                            error="" if ok else "refused"))))


def holding_placed(h: Harness) -> tuple[list[Effect], Callable[[list[Effect]], None]]:
    """Keep every placement record the core publishes from here on unanswered: returns
    the list they are kept in and the harness's own carry-out (put it back to answer)."""
    held: list[Effect] = []
    carry_out = h._carry_out

    def hold(effects: list[Effect]) -> None:
        def placed(e: Effect) -> bool:
            return isinstance(e, Publish) and e.tag.startswith("placements:")

        held.extend(e for e in effects if placed(e))
        carry_out([e for e in effects if not placed(e)])

    h._carry_out = hold  # type: ignore[method-assign]
    return held, carry_out


def failover_ready(tmp_path: Path, store: MemoryStartHistory | None = None) -> Harness:
    """h1 runs vm-a and vm-b; h2 and h3 are empty (h3 has the most room); the core leads."""
    h = Harness(tmp_path, store)
    h.inventory("h1", ["vm-a", "vm-b"])
    h.inventory("h2", [], memory_mb=8192)
    h.inventory("h3", [], memory_mb=32768)
    h.lead()
    return h


# -- S1: only a confirmed fence of that incident and boot releases a host's VMs --------


def test_no_vm_is_started_before_the_fence_of_its_incident_and_boot_is_confirmed_off(tmp_path: Path) -> None:
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.tick()
    h.fence("h1", "h1-b1-1", "h1-b1", outcome="failed")
    h.fence("h1", "h1-b1-1", "h1-b1", outcome="unreachable")
    h.deliver(HostEvent(host="h1", kind="fence_failed", at=h.wall, incident="h1-b1-1"))
    h.tick()
    assert h.starts() == []
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]
    assert all(target != "h1" for target, _ in h.starts())


def test_a_fence_result_releases_the_vms_of_the_boot_it_fenced_and_nothing_a_later_boot_runs(
    tmp_path: Path,
) -> None:
    """h1 was fenced as boot b1 but is back as b2, which reports vm-a running (and is
    suspect now). The confirmed off of b1 releases what b1 ran and b2 does not:
    vm-b. Before: vm-a too, started elsewhere while b2 ran it (S0). A result that
    names no boot, of another incident than the open one, releases nothing (which
    boot it saw off is not known; before: the open incident's, b2's)."""
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a", "vm-b"], boot="h1-b1")
    h.suspect("h1", "h1-b1-7", "h1-b1")  # b1's incident is open: b2's report does not release b1
    h.inventory("h1", ["vm-a"], boot="h1-b2")
    h.inventory("h2", [])
    h.lead()
    h.tick()
    assert h.starts() == []
    h.suspect("h1", "h1-b2-1", "h1-b2")
    h.fence("h1", "h1-b1-7", "")
    h.tick()
    assert h.starts() == []
    h.fence("h1", "h1-b1-7", "h1-b1")  # a late result of the first boot's incident
    assert h.starts() == [("h2", "vm-b")]
    h.answer("vm-b")
    h.fence("h1", "h1-b2-1", "h1-b2")  # b2 is off now too: vm-a goes
    assert h.starts() == [("h2", "vm-b"), ("h2", "vm-a")]


def test_an_operator_confirmation_releases_the_host(tmp_path: Path) -> None:
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.deliver(HostEvent(host="h1", kind="confirmed_fenced", at=h.wall, incident="h1-b1-1", by="ops"))
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]


def test_the_release_rule_is_the_one_module_function_the_simulation_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The planted bug "start before confirmed off" replaces ``state.host_released``:
    the core must take its answer, or the simulation could not catch the bug."""
    monkeypatch.setattr(scheduler_state, "host_released", lambda *args: True)
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    assert h.starts(), "the core did not ask state.host_released"


# -- the record before the command ----------------------------------------------------


def test_every_start_of_a_wave_is_recorded_before_any_request_and_placed_before_its_request(
    tmp_path: Path,
) -> None:
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.fence("h1", "h1-b1-1", "h1-b1")
    first_request = next(i for i, t in enumerate(h.trace) if t[0] == "request")
    records = [(i, t) for i, t in enumerate(h.trace) if t[0] == "record"]
    assert records and records[0][0] < first_request
    assert sorted(records[0][1][1]) == ["vm-a", "vm-b"] and records[0][1][2] is True  # durable, both VMs
    for target, vm in h.starts():
        placed = h.trace.index(("placed", vm))
        assert placed < h.trace.index(("request", target, vm))
    # One record for the wave, not one per VM.
    assert [t[1].rsplit(".", 1)[0] for t in h.trace if t[0] == "publish" and ".placements." in t[1]] == [
        "hafence.vm.placements.record"]
    # The results: written once the wave is answered, not durable.
    h.answer("vm-a")
    h.answer("vm-b")
    assert [t for t in h.trace if t[0] == "record"][-1][2] is False
    assert {row[3] for row in h.store.rows.values()} == {"started"}
    assert not h.core.own_records  # its record read back: nothing kept for it


def test_nothing_is_sent_when_the_starts_could_not_be_recorded(tmp_path: Path) -> None:
    class DiskFull(MemoryStartHistory):
        def record(self, rows, durable):  # type: ignore[no-untyped-def]
            raise OSError("disk full")

    h = failover_ready(tmp_path, DiskFull())
    h.fence("h1", "h1-b1-1", "h1-b1")
    h.tick()
    assert [t[0] for t in h.trace if t[0] == "record"] and h.starts() == []
    assert not h.core.state.reserved  # free to be placed again once the store works
    assert not [t for t in h.trace if t[0] == "placed"]


# -- a start's reply: asked again, or moved on ---------------------------------------


def vm_a_fenced_off_h1(tmp_path: Path) -> Harness:
    """h1 (running vm-a) suspected and fenced; h2 has the most room, h3 some."""
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a"])
    h.inventory("h2", [], memory_mb=32768)
    h.inventory("h3", [], memory_mb=8192)
    h.lead()
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.fence("h1", "h1-b1-1", "h1-b1")
    return h


def test_an_unanswered_start_is_asked_again_on_the_same_host_until_that_host_is_fenced(tmp_path: Path) -> None:
    h = vm_a_fenced_off_h1(tmp_path)
    assert h.starts() == [("h2", "vm-a")]
    # No answer in time: h2 may be starting it, so h2 is asked again, never h3 (S0).
    h.answer("vm-a", error="timeout: nats: timeout")
    assert h.starts() == [("h2", "vm-a"), ("h2", "vm-a")]
    h.answer("vm-a", error="error: ConnectionClosedError")
    assert h.starts()[-1] == ("h2", "vm-a")
    # h2 is fenced meanwhile: whatever it started is off, so vm-a moves on.
    h.suspect("h2", "h2-b1-1", "h2-b1")
    h.fence("h2", "h2-b1-1", "h2-b1")
    h.answer("vm-a", error="timeout: nats: timeout")
    assert h.starts()[-1] == ("h3", "vm-a")


def test_a_start_nobody_heard_or_the_agent_refused_moves_to_another_host(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a", "vm-b"])
    h.inventory("h2", [], memory_mb=32768)
    h.inventory("h3", [], memory_mb=8192)
    h.lead()
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert sorted(h.starts()) == [("h2", "vm-a"), ("h2", "vm-b")]
    h.answer("vm-a", error="no_responders: nats: no responders available for request")
    h.answer("vm-b", ok=False)
    assert sorted(h.starts()[2:]) == [("h3", "vm-a"), ("h3", "vm-b")]
    failed = [row for row in h.store.rows.values() if row[3] == "failed"]
    assert sorted((row[0], row[2]) for row in failed) == [("vm-a", "h2"), ("vm-b", "h2")]


def test_nobody_listening_when_a_start_in_doubt_is_asked_again_does_not_move_the_vm(tmp_path: Path) -> None:
    """Simulation seed 44 (S1): vm-a's start on h2 went unanswered (h2 got it, started
    it, and was cut off before its reply); asked again, nobody listened on h2 any more,
    and the VM was started on h3 while it ran on h2. Nobody hearing the second ask says
    nothing of the first: it waits for h2's fate like any start in doubt."""
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a"])
    h.inventory("h2", [], memory_mb=32768)
    h.inventory("h3", [], memory_mb=8192)
    h.lead()
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert h.starts() == [("h2", "vm-a")]
    h.answer("vm-a", error="timeout: nats: timeout")
    assert h.starts() == [("h2", "vm-a"), ("h2", "vm-a")]
    h.answer("vm-a", error="no_responders: nats: no responders available for request")
    assert all(target == "h2" for target, _ in h.starts())
    assert not [row for row in h.store.rows.values() if row[3] == "failed"]
    # h2 is fenced: whatever it started is off, and vm-a moves on.
    h.suspect("h2", "h2-b1-1", "h2-b1")
    h.fence("h2", "h2-b1-1", "h2-b1")
    h.answer("vm-a", error="no_responders: nats: no responders available for request")
    assert h.starts()[-1] == ("h3", "vm-a")


# -- restarts and takeovers use the history -------------------------------------------


def test_a_restarted_scheduler_asks_the_host_its_store_says_it_chose(tmp_path: Path) -> None:
    store = MemoryStartHistory()
    first = failover_ready(tmp_path / "a", store)
    first.fence("h1", "h1-b1-1", "h1-b1")
    chosen = dict((vm, target) for target, vm in first.starts())
    assert set(chosen.values()) == {"h3"}
    # It dies before any answer; a new core, the same store, the stream replayed.
    second = Harness(tmp_path / "b", store)
    second.inventory("h1", ["vm-a", "vm-b"])
    second.inventory("h2", [], memory_mb=65536)  # placement afresh would pick h2 now
    second.inventory("h3", [], memory_mb=8192)
    second.fence("h1", "h1-b1-1", "h1-b1")
    second.lead()
    assert dict((vm, target) for target, vm in second.starts()) == chosen


@pytest.mark.parametrize("record", [True, False], ids=["placement record", "placed event of before records"])
def test_a_standby_taking_over_mid_failover_asks_the_host_its_predecessor_placed_the_vm_on(
    tmp_path: Path, record: bool,
) -> None:
    """The standby's own store knows nothing; the stream has the predecessor's
    placement (in a record, or a per-VM ``placed`` written before records). Before:
    the standby placed the VM afresh (on h3, the most room) while h2 might be
    booting it (S0)."""
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a", "vm-b"])
    h.inventory("h2", [], memory_mb=8192)
    h.inventory("h3", [], memory_mb=65536)
    h.fence("h1", "h1-b1-1", "h1-b1")
    placed = VmEvent(vm="vm-a", kind="placed", at=h.wall, incident="h1-b1-1", from_host="h1", target="h2")
    if record:
        h.stored_elsewhere([placed], seq=3)
    else:
        h.deliver(placed)
    h.lead()
    assert ("h2", "vm-a") in h.starts() and ("h2", "vm-b") not in h.starts()
    # Its own record follows the predecessor's: stored, not refused.
    assert not [t for t in h.trace if t[0] == "conflict"] and ("placed", "vm-a") in h.trace


def test_no_start_is_sent_once_the_lease_has_run_out(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a"])
    h.inventory("h2", [])
    h.feed(CaughtUp("events"))
    h.feed(LeaseChanged(held=True, term=1, valid_until=h.mono + 2))
    h.mono += 3  # paused past its lease: the driver has not said so yet
    h.fence("h1", "h1-b1-1", "h1-b1")
    h.tick()
    assert h.starts() == []


def test_a_large_wave_keeps_a_bounded_number_of_commands_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    names = [f"vm-{i:03d}" for i in range(COMMANDS_IN_FLIGHT + 5)]
    h.inventory("h1", names)
    h.inventory("h2", [], memory_mb=1 << 20, vcpus=256)
    h.inventory("h3", [], memory_mb=1 << 20, vcpus=256)
    h.lead()
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert len(h.starts()) == len(h.open) == COMMANDS_IN_FLIGHT
    # All of them were recorded before the first command: the rest only wait for room.
    assert sorted(next(t[1] for t in h.trace if t[0] == "record")) == names
    h.answer(h.starts()[0][1])
    assert len(h.starts()) == COMMANDS_IN_FLIGHT + 1 and len(h.open) == COMMANDS_IN_FLIGHT
    while h.open:
        h.answer(next(iter(h.open.values())).message.vm.name)  # type: ignore[union-attr]
    assert sorted(vm for _, vm in h.starts()) == names


def test_a_wave_recorded_after_the_lease_ran_out_is_not_sent(tmp_path: Path) -> None:
    h = failover_ready(tmp_path)
    h.hold_store = True
    h.fence("h1", "h1-b1-1", "h1-b1")
    h.mono += 2000  # the disk was slow, and the process paused past its lease
    h.release_store()
    assert h.starts() == [] and not h.core.state.reserved
    # Leading again, it asks the hosts it recorded (the "sending" records), not others.
    recorded = {row[0]: row[2] for row in h.store.rows.values()}
    h.feed(LeaseChanged(held=True, term=2, valid_until=h.mono + 1000))
    assert {vm: target for target, vm in h.starts()} == recorded


# -- two processes that both believe they lead: the placed compare-and-set ------------


def test_a_leader_that_missed_another_ones_placement_sends_no_start_and_follows_it(tmp_path: Path) -> None:
    """Seed 71: a leader suspended past its lease (its monotonic clock missed it)
    wakes and places vm-a on h3, while the leader of the meantime placed it on h2
    (stored, not yet read here). Its record loses the compare-and-set: no
    ``VmStart`` at all, its records withdrawn; once the replay brings the other
    record, vm-a is asked of h2 only. Before: started on h3 as well (S0)."""
    h = failover_ready(tmp_path)
    other = VmEvent(vm="vm-a", kind="placed", at=h.wall, incident="h1-b1-1", from_host="h1", target="h2")
    h.stored_elsewhere([other], seq=7, read=False)
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert ("conflict", "hafence.vm.placements.record.*") in h.trace
    assert h.starts() == [] and not h.core.own_records  # the refused record is never read back
    assert {row[3] for row in h.store.rows.values()} == {"withdrawn"}
    h.tick()
    h.inventory("h2", [], memory_mb=8192)
    assert h.starts() == []  # nothing until the replay brings the record it missed
    h.feed(Delivered("events", "hafence.vm.placements.record.other-7",
                     Placements(at=h.wall, placed=[other]), sequence=7))
    h.tick()
    assert sorted(h.starts()) == [("h2", "vm-a"), ("h3", "vm-b")]


def test_any_record_stored_since_the_last_one_read_refuses_the_next_whatever_vms_it_placed(
    tmp_path: Path,
) -> None:
    """One compare-and-set over every scheduler's records: another leader's record of
    a VM this wave does not hold (vm-z, another incident) refuses it all the same. So
    a record is stored only by a process that has read every placement before it."""
    h = failover_ready(tmp_path)
    h.stored_elsewhere([VmEvent(vm="vm-z", kind="placed", at=h.wall, incident="h9-b1-1", target="h2")], seq=4,
                       read=False)
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert h.starts() == [] and [t[0] for t in h.trace].count("conflict") == 1
    h.feed(Delivered("events", "hafence.vm.placements.record.other-4", Placements(at=h.wall, placed=[
        VmEvent(vm="vm-z", kind="placed", at=h.wall, incident="h9-b1-1", target="h2")]), sequence=4))
    h.tick()
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]
    [publish] = [e for e in h.published if isinstance(e.message, Placements)][-1:]
    assert publish.expect_last_subject_seq == 4


def test_a_record_read_after_a_wave_was_placed_and_before_its_record_went_withdraws_the_wave(
    tmp_path: Path,
) -> None:
    """The compare-and-set proves nothing was stored between the record a process
    expects and its own; the wave must also have been decided after that one. Here the
    other leader's record (vm-a on h2) is read while the wave's starts are written to
    disk: expecting it now would store a wave placed without it, and vm-a would start
    on h2 and on h3 (S0). The wave is withdrawn and decided again."""
    h = failover_ready(tmp_path)
    h.hold_store = True
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert sorted(vm for vm, _ in h.core.state.reserved) == ["vm-a", "vm-b"]  # placed, being recorded
    other = VmEvent(vm="vm-a", kind="placed", at=h.wall, incident="h1-b1-1", from_host="h1", target="h2")
    h.stored_elsewhere([other], seq=7)
    h.release_store()
    assert not [r for r in records(h) if any(p.target == "h3" and p.vm == "vm-a" for p in r.message.placed)]  # type: ignore[attr-defined]
    assert sorted(h.starts()) == [("h2", "vm-a"), ("h3", "vm-b")]
    assert not [t for t in h.trace if t[0] == "conflict"]


def test_a_placement_read_before_the_refusal_of_its_own_record_arrives_is_followed(tmp_path: Path) -> None:
    """Seed 100 with fences that reboot: the other leader's record of vm-a (on h2) is
    stored, then this leader's (expecting none) is refused, and the replay brings the
    other one while the refusal is on its way. Placing waits for a record newer than
    the one its own expected, which it has read already: vm-a is asked of h2. Before:
    it waited for one newer than the one read at the refusal, which never came, and the
    VM was never placed again, in this incident or a later one (L1)."""
    h = failover_ready(tmp_path)
    held, carry_out = holding_placed(h)
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert h.starts() == [] and len(held) == 1
    h._carry_out = carry_out  # type: ignore[method-assign]
    # The other leader's record is stored, and read here, before this one's is answered.
    other = VmEvent(vm="vm-a", kind="placed", at=h.wall, incident="h1-b1-1", from_host="h1", target="h2")
    h.stored_elsewhere([other], seq=7)
    h._carry_out(held)
    h.feed(TimerFired("none"))
    assert ("conflict", "hafence.vm.placements.record.*") in h.trace
    # Decided again at once, from what it has read: no wait for a record newer still.
    assert sorted(h.starts()) == [("h2", "vm-a"), ("h3", "vm-b")]


def test_a_start_goes_out_only_once_its_record_is_stored(tmp_path: Path) -> None:
    h = failover_ready(tmp_path)
    acks, carry_out = holding_placed(h)
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert h.starts() == [] and len(acks) == 1
    [record] = acks
    assert isinstance(record, Publish) and isinstance(record.message, Placements)
    assert sorted(p.vm for p in record.message.placed) == ["vm-a", "vm-b"]
    # No record read yet: it expects none over every scheduler's records.
    assert (record.expect_last_subject_seq, record.expect_last_of) == (0, "hafence.vm.placements.record.*")
    h._carry_out = carry_out  # type: ignore[method-assign]
    h._carry_out(acks)
    h.feed(TimerFired("none"))
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]


def test_the_same_leader_asks_again_after_an_unanswered_start_before_its_placed_is_read(tmp_path: Path) -> None:
    """Its own placed is a duplicate message id of the one stored: acked, no conflict."""
    h = failover_ready(tmp_path)
    h.echo = False  # the replay has not read its own placed back yet
    h.fence("h1", "h1-b1-1", "h1-b1")
    first = h.starts()
    h.answer("vm-b")
    h.answer("vm-a", error="timeout: nats: timeout")
    assert len(h.starts()) == 3 and h.starts()[-1] == next(s for s in first if s[1] == "vm-a")
    assert not [t for t in h.trace if t[0] == "conflict"]


# -- a host that rebooted before anyone opened an incident of its old boot -----------


def test_a_new_boot_with_no_incident_of_the_old_one_open_restarts_the_old_boots_ha_vms(tmp_path: Path) -> None:
    """Seeds 31, 63, 157...: h1 crashed and booted again within the detection window
    (never suspected, never fenced). Its new boot's report proves the old boot, and
    its VMs, gone. Before: nothing ever released them (L1)."""
    h = failover_ready(tmp_path)
    h.tick()
    assert h.starts() == []
    h.inventory("h1", [], boot="h1-b2")
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]
    # The old boot's late report, or a late fence of it, releases nothing twice.
    for vm in ("vm-a", "vm-b"):
        h.answer(vm)
    h.inventory("h1", ["vm-a", "vm-b"], boot="h1-b1")
    h.fence("h1", "h1-b1-1", "h1-b1")
    h.tick()
    assert len(h.starts()) == 2


def test_a_new_boot_waits_for_the_fence_of_its_old_boots_open_incident(tmp_path: Path) -> None:
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.inventory("h1", [], boot="h1-b2")
    h.tick()
    assert h.starts() == []  # S1: the old boot's incident is the fencer's to close
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]


def test_an_incident_of_the_old_boot_closed_by_the_new_boots_return_restarts_its_ha_vms(tmp_path: Path) -> None:
    """Seed 71 (later tree): h1's old boot was suspect, never fenced; h1 came back as
    a new boot and the monitor closed the incident (alive). Before: nothing released
    the old boot's VMs (L1)."""
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.inventory("h1", [], boot="h1-b2", memory_mb=1 << 20)
    h.tick()
    assert h.starts() == []
    h.deliver(HostEvent(host="h1", kind="alive", at=h.wall, incident="h1-b1-1", boot_id="h1-b2"))
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]


def test_the_returning_boot_takes_none_of_them_while_the_old_incidents_fence_is_under_way(tmp_path: Path) -> None:
    """Seed 293: the fence of the old boot's incident, requested before the host came
    back, finishes and powers the new boot off: VMs placed there would die unreleased.
    (Seed 262: with no fence requested, held by the storm guard, the new boot is room.)"""
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.deliver(HostEvent(host="h1", kind="fence_requested", at=h.wall, incident="h1-b1-1",
                        request_id="fence-h1-b1-1", term=1, boot_id="h1-b1"))
    h.inventory("h1", [], boot="h1-b2", memory_mb=1 << 20)
    h.deliver(HostEvent(host="h1", kind="alive", at=h.wall, incident="h1-b1-1", boot_id="h1-b2"))
    h.tick()
    assert all(target != "h1" for target, _ in h.starts())


# -- S1 against two claims: a suspect host's report holds a VM -----------------------


def test_a_vm_a_suspect_host_reported_running_is_not_started_while_its_incident_is_open(tmp_path: Path) -> None:
    """Seeds 145, 252: h1 (suspect, its fence not confirmed) last reported vm-a running
    in the boot its incident is about; h2's agent (compromised) claims vm-a too, and
    h2 is fenced. Before: vm-a, "lost" with h2, was started on h3 while h1's incident
    was open (S1: the scheduler cannot tell which claim is true)."""
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a"], boot="h1-b1")
    h.inventory("h2", [])
    h.inventory("h3", [], memory_mb=65536)
    h.lead()
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.inventory("h1", [], boot="h1-b2")  # back as a new boot: b1's incident stays open
    h.inventory("h2", ["vm-a"])  # the lie
    h.suspect("h2", "h2-b1-1", "h2-b1")
    h.fence("h2", "h2-b1-1", "h2-b1")
    h.tick()
    assert h.starts() == []
    h.fence("h1", "h1-b1-1", "h1-b1")  # h1's fate is known: vm-a may run again
    assert h.starts() == [("h3", "vm-a")]


def test_a_fence_of_a_boot_the_host_never_reported_releases_the_boot_it_ran_when_suspected(tmp_path: Path) -> None:
    """Seed 27: a compromised agent's forged heartbeat made the monitor suspect h1 under a
    boot id h1 never reported; the fence of that boot powered h1 off. Before: nothing
    was released (the forged boot ran nothing) and h1's real VMs stayed down (L1)."""
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-forged-1", "forged-1234")
    h.fence("h1", "h1-forged-1", "forged-1234")
    assert sorted(vm for _, vm in h.starts()) == ["vm-a", "vm-b"]


# -- what a failover costs the scheduler's one event loop (issue 12) ----------------------


class Walks:
    """Counts the failover waves a pass builds and the placements they ask for."""

    def __init__(self, h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        wave, place = h.core._wave, scheduler_placement.place

        def counting_wave(*args):  # type: ignore[no-untyped-def]
            self.calls.append("wave")
            return wave(*args)

        def counting_place(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append("place")
            return place(*args, **kwargs)

        monkeypatch.setattr(h.core, "_wave", counting_wave)
        monkeypatch.setattr(scheduler_placement, "place", counting_place)


def test_while_every_lost_vm_is_being_started_events_run_no_failover_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between a wave's replies and the inventories that show its VMs running, each
    event (the wave's own placed/started events read back, inventories, ticks) ran a
    pass over the three priorities that could place nothing: in the pipeline bench,
    most of the scheduler's CPU for a 50-VM failover."""
    h = failover_ready(tmp_path)
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.fence("h1", "h1-b1-1", "h1-b1")
    h.answer("vm-a")
    h.answer("vm-b")
    walks = Walks(h, monkeypatch)
    for vm in ("vm-a", "vm-b"):
        h.deliver(VmEvent(vm=vm, kind="started", at=h.wall, incident="h1-b1-1", from_host="h1", target="h3"))
    h.tick()
    h.inventory("h2", [], memory_mb=8192)
    assert walks.calls == []
    assert len(h.starts()) == 2


def test_a_start_asked_again_holds_its_room_when_the_same_wave_places_others(tmp_path: Path) -> None:
    """Simulation seed 14 (a host left with -2048 MiB): a start asked again on h2 (its
    first ask unanswered: the VM may be running there) and a VM placed afresh went out
    in one wave, and placement did not count the one asked again, so both went to h2,
    which had room for one."""
    h = Harness(tmp_path)
    h.inventory("h1", ["vm-a", "vm-b"])
    h.inventory("h2", [], memory_mb=1536)  # room for one 1024 MiB VM
    h.inventory("h3", [], memory_mb=1024)
    h.lead()
    h.suspect("h1", "h1-b1-1", "h1-b1")
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert sorted(h.starts()) == [("h2", "vm-a"), ("h3", "vm-b")]
    h.answer("vm-b", ok=False)  # refused on h3: vm-b waits, h2 is taken by vm-a's start
    assert len(h.starts()) == 2
    h.answer("vm-a", error="timeout: nats: timeout")  # in doubt: asked again on h2, never elsewhere
    assert h.starts()[2:] == [("h2", "vm-a")], "vm-b must not take the room of vm-a's start asked again"


def test_a_wave_of_starts_asked_again_on_the_same_host_places_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start asked again (unanswered before) goes to the host asked before: nothing
    is placed, so the candidates (every host's load and the reservations) are not built."""
    h = vm_a_fenced_off_h1(tmp_path)
    walks = Walks(h, monkeypatch)
    h.answer("vm-a", error="timeout: nats: timeout")
    assert h.starts() == [("h2", "vm-a"), ("h2", "vm-a")]
    assert "wave" in walks.calls and "place" not in walks.calls


def test_a_host_event_illegal_in_its_phase_is_logged_with_its_count(tmp_path: Path) -> None:
    """The scheduler steps hafence.host_phase; what the table calls illegal keeps the
    phase and is counted (state), and the core logs it, never drops it silently."""
    from hafence.core.effects import Log
    from hafence.core.events import TimerFired
    from hafence.host_phase import EventKind, Phase

    h = Harness(tmp_path)
    h.core.state.phases["h1"] = Phase.FENCED
    assert not h.core.state._step("h1", EventKind.FENCE_FAILED)
    effects = h.core.handle(TimerFired("tick"), Now(h.mono, h.wall))
    [log] = [e for e in effects if isinstance(e, Log) and "illegal" in e.message]
    assert log.level == "warning" and log.fields["host"] == "h1" and log.fields["count"] == 1
    assert log.fields["event"] == "fence_failed" and log.fields["phase"] == "fenced"
    assert h.core.state.phases["h1"] == Phase.FENCED
    assert not [e for e in h.core.handle(TimerFired("tick"), Now(h.mono, h.wall)) if isinstance(e, Log)
                and "illegal" in e.message]  # logged once


# -- one placement record at a time ----------------------------------------------------


def records(h: Harness) -> list[Publish]:
    return [e for e in h.published if isinstance(e.message, Placements)]


def test_a_wave_sends_one_record_for_its_commands_in_flight_and_one_for_those_replies_free_meanwhile(
    tmp_path: Path,
) -> None:
    """One record at a time, each expecting the one before (its own ack's sequence):
    the replies that come while a record is on its way share the next one."""
    h = Harness(tmp_path)
    names = [f"vm-{i:03d}" for i in range(COMMANDS_IN_FLIGHT + 10)]
    h.inventory("h1", names)
    h.inventory("h2", [], memory_mb=1 << 20, vcpus=256)
    h.lead()
    h.echo = False  # its own records are not read back: the acks alone keep it in step
    h.fence("h1", "h1-b1-1", "h1-b1")
    [first] = records(h)
    assert len(first.message.placed) == COMMANDS_IN_FLIGHT  # type: ignore[attr-defined]
    held, carry_out = holding_placed(h)
    h.answer(h.starts()[0][1])  # one command done: a record of one
    assert len(held) == 1 and len(held[0].message.placed) == 1  # type: ignore[attr-defined]
    for _, vm in h.starts()[1:4]:
        h.answer(vm)  # three more while it is on its way: no second record in flight
    assert len(held) == 1
    h._carry_out = carry_out  # type: ignore[method-assign]
    h._carry_out(held)
    h.feed(TimerFired("none"))
    assert [len(r.message.placed) for r in records(h)] == [COMMANDS_IN_FLIGHT, 1, 3]  # type: ignore[attr-defined]
    assert [r.expect_last_subject_seq for r in records(h)] == [0, 1, 2]
    while h.open:
        h.answer(next(iter(h.open.values())).message.vm.name)  # type: ignore[union-attr]
    assert sorted(vm for _, vm in h.starts()) == names
    assert not [t for t in h.trace if t[0] == "conflict"]


def test_a_vm_restart_waits_for_the_wave_record_on_its_way_and_expects_it(tmp_path: Path) -> None:
    """A wave and a VM-level restart of the same process: two records in flight
    would both expect the same sequence and one would be refused."""
    h = failover_ready(tmp_path)
    h.inventory("h3", ["vm-c"], memory_mb=32768)
    held, carry_out = holding_placed(h)
    h.fence("h1", "h1-b1-1", "h1-b1")
    assert len(held) == 1
    crashed = VmInfo(spec=VmSpec(name="vm-c", memory_mb=1024, ha=True), state="stopped", stop_reason="crashed",
                     stopped_at=h.wall - 1)
    h.deliver(Inventory(host="h3", boot_id="h3-b1", memory_mb=32768, vcpus=16, sent_at=h.wall, vms=[crashed]))
    h.tick()
    assert len(held) == 1 and h.core.restart_queue  # its record waits
    h._carry_out = carry_out  # type: ignore[method-assign]
    h._carry_out(held)
    h.feed(TimerFired("none"))
    _wave, restart = records(h)
    assert [p.vm for p in restart.message.placed] == ["vm-c"]  # type: ignore[attr-defined]
    assert restart.expect_last_subject_seq == 1 and ("h3", "vm-c") in h.starts()
    assert not [t for t in h.trace if t[0] == "conflict"]


def test_a_vm_restart_decided_before_another_schedulers_record_was_read_is_not_sent(tmp_path: Path) -> None:
    """The restart of vm-c waits behind the wave's record; meanwhile another leader's
    record is read. The restart was decided without it: not sent, decided again after
    the back-off (``unconfirmed``)."""
    h = failover_ready(tmp_path)
    h.inventory("h3", ["vm-c"], memory_mb=32768)
    held, carry_out = holding_placed(h)
    h.fence("h1", "h1-b1-1", "h1-b1")
    crashed = VmInfo(spec=VmSpec(name="vm-c", memory_mb=1024, ha=True), state="stopped", stop_reason="crashed",
                     stopped_at=h.wall - 1)
    h.deliver(Inventory(host="h3", boot_id="h3-b1", memory_mb=32768, vcpus=16, sent_at=h.wall, vms=[crashed]))
    h.tick()
    assert h.core.restart_queue
    h.stored_elsewhere([VmEvent(vm="vm-z", kind="placed", at=h.wall, incident="h9-b1-1", target="h2")], seq=7)
    h._carry_out = carry_out  # type: ignore[method-assign]
    h._carry_out(held)
    h.feed(TimerFired("none"))
    assert not [r for r in records(h) if [p.vm for p in r.message.placed] == ["vm-c"]]  # type: ignore[attr-defined]
    assert "vm-c" not in h.core.state.restarts.in_flight and ("h3", "vm-c") not in h.starts()
