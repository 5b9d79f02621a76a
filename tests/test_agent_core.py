"""The agent core alone: events in, effects out, its ports played by a small fake
host (no NATS, no clock, no hypervisor). Each test names the rule it guards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hafence.agent.core import AgentCore, HostState, WatchdogStatus
from hafence.config import ClusterConfig, parse_config
from hafence.contracts import AgentReply, Heartbeat, HostEvent, Inventory, VmInfo, VmSpec, VmStart, VmStop
from hafence.core import (
    Asked,
    Call,
    Delivered,
    Effect,
    Event,
    Now,
    Publish,
    Reply,
    Returned,
    SetTimer,
    Started,
    TimerFired,
)
from tests.conftest import cluster_toml

CMD = "hafence.agent.h1.cmd"


class FakeHost:
    """The ports of one host: power and boot id, the VMs running, calls seen."""

    def __init__(self, running: tuple[str, ...] = ()) -> None:
        self.on = True
        self.boot_id = "boot-1"
        self.defined: dict[str, VmSpec] = {n: VmSpec(name=n, memory_mb=1) for n in running}
        self.running = set(running)
        self.calls: list[Call] = []
        self.hold: set[str] = set()  # ops left unanswered (a slow start)
        self.held: list[Call] = []

    def answer(self, call: Call) -> object:
        match call.port, call.op:
            case "host", "state":
                return HostState(on=self.on, boot_id=self.boot_id)
            case "hypervisor", "list_vms":
                return [VmInfo(spec=spec, state="running" if n in self.running else "stopped")
                        for n, spec in self.defined.items()]
            case "hypervisor", "is_running":
                return call.args[0] in self.running
            case "hypervisor", "start":
                spec: VmSpec = call.args[0]
                self.defined.setdefault(spec.name, spec)
                self.running.add(spec.name)
                return None
            case "hypervisor", "stop":
                self.running.discard(call.args[0])
                return None
            case "hypervisor", "stop_all":
                self.running.clear()
                return None
            case "hypervisor", "disable_autostart" | "boot":
                return []
            case "storage", "renew":
                return None
            case "definitions", "resolve":
                # The test's own files: the core asks, the port reads the filesystem.
                return os.path.realpath(call.args[0]), os.path.realpath(call.args[1])
        raise AssertionError(f"unexpected call {call}")


class Run:
    """Feeds a core and plays its ports at once (a long poll is never answered)."""

    def __init__(self, core: AgentCore, host: FakeHost) -> None:
        self.core, self.host = core, host
        self.mono = 100.0
        self.effects: list[Effect] = []

    def now(self) -> Now:
        return Now(mono=self.mono, wall=1_000_000.0 + self.mono)

    def feed(self, event: Event) -> list[Effect]:
        out: list[Effect] = []
        queue: list[Event] = [event]
        while queue:
            effects = self.core.handle(queue.pop(0), self.now())
            out += effects
            for effect in effects:
                if isinstance(effect, Call) and effect.op != "changed":
                    self.host.calls.append(effect)
                    if effect.op in self.host.hold:
                        self.host.held.append(effect)
                        continue
                    value = self.host.answer(effect)
                    if effect.tag:
                        queue.append(Returned(effect.tag, value=value))
                elif isinstance(effect, Publish) and effect.tag:
                    queue.append(Returned(effect.tag))
        self.effects += out
        return out

    def release(self, op: str) -> list[Effect]:
        """Answer the held calls of ``op`` now."""
        self.host.hold.discard(op)
        out: list[Effect] = []
        for call in [c for c in self.host.held if c.op == op]:
            self.host.held.remove(call)
            out += self.feed(Returned(call.tag, value=self.host.answer(call)))
        return out


def config(tmp_path: Path, extra: str = "") -> ClusterConfig:
    return parse_config(cluster_toml("nats://127.0.0.1:4222", tmp_path, 2, extra), "test.toml")


def started(tmp_path: Path, host: FakeHost | None = None, extra: str = "") -> Run:
    run = Run(AgentCore(config(tmp_path, extra), "h1"), host or FakeHost())
    run.feed(Started())
    return run


def replies(effects: list[Effect]) -> list[AgentReply]:
    return [e.message for e in effects if isinstance(e, Reply) and isinstance(e.message, AgentReply)]


def ops(host: FakeHost, op: str) -> list[Call]:
    return [c for c in host.calls if c.port == "hypervisor" and c.op == op]


def inventories(effects: list[Effect]) -> list[Inventory]:
    return [e.message for e in effects if isinstance(e, Publish) and isinstance(e.message, Inventory)]


def heartbeats(effects: list[Effect]) -> list[Heartbeat]:
    return [e.message for e in effects if isinstance(e, Publish) and isinstance(e.message, Heartbeat)]


@pytest.mark.parametrize("definition", ["<domain><name>vm-a</name></domain>", "/elsewhere/vm-a.xml",
                                        "{defs}/../elsewhere.xml"])
def test_a_start_whose_definition_is_not_allowed_is_refused_without_a_hypervisor_start(
    tmp_path: Path, definition: str
) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    run = started(tmp_path, extra=f'[storage]\ndefinitions_dir = "{defs}"\n')
    spec = VmSpec(name="vm-a", memory_mb=1, definition=definition.format(defs=defs))
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=spec), token=7)))
    assert not reply.ok and "definitions_dir" in reply.error
    assert ops(run.host, "start") == []  # refused before the hypervisor is asked
    # A path under the directory is taken.
    ok = VmSpec(name="vm-a", memory_mb=1, definition=str(defs / "vm-a.xml"))
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=ok), token=8)))
    assert reply.ok and len(ops(run.host, "start")) == 1


def test_a_definition_path_is_judged_by_what_the_definitions_port_resolves_it_to(tmp_path: Path) -> None:
    """The core reads no filesystem: a link under the directory pointing out of it
    (as the port resolves it) is refused, the same path resolving inside is taken."""
    defs = tmp_path / "defs"  # never created: only the port's answer counts

    class LinkedHost(FakeHost):
        target = "/etc/shadow-disk.xml"

        def answer(self, call: Call) -> object:
            if (call.port, call.op) == ("definitions", "resolve"):
                return self.target, str(defs)
            return super().answer(call)

    host = LinkedHost()
    run = started(tmp_path, host, extra=f'[storage]\ndefinitions_dir = "{defs}"\n')
    spec = VmSpec(name="vm-a", memory_mb=1, definition=str(defs / "vm-a.xml"))
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=spec), token=1)))
    assert not reply.ok and "definitions_dir" in reply.error and ops(host, "start") == []
    assert [c.args for c in host.calls if c.port == "definitions"] == [(str(defs / "vm-a.xml"), str(defs))]
    host.target = str(defs / "real" / "vm-a.xml")
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=spec), token=2)))
    assert reply.ok and len(ops(host, "start")) == 1
    # The directory itself is no definition.
    host.target = str(defs)
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name="vm-b", memory_mb=1,
                                                                   definition=str(defs))), token=3)))
    assert not reply.ok


def test_a_symlink_under_the_definitions_directory_pointing_out_of_it_is_refused(tmp_path: Path) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    (tmp_path / "elsewhere.xml").write_text("<domain/>")
    (defs / "link.xml").symlink_to(tmp_path / "elsewhere.xml")
    run = started(tmp_path, extra=f'[storage]\ndefinitions_dir = "{defs}"\n')
    spec = VmSpec(name="vm-a", memory_mb=1, definition=str(defs / "link.xml"))
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=spec), token=1)))
    assert not reply.ok and "definitions_dir" in reply.error and ops(run.host, "start") == []


def test_a_start_of_a_vm_already_running_answers_already_without_starting(tmp_path: Path) -> None:
    run = started(tmp_path, FakeHost(running=("vm-a",)))
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name="vm-a", memory_mb=1)), token=1)))
    assert reply.ok and reply.already and reply.state == "running"
    assert ops(run.host, "start") == []
    # A VM that is not running is started, and is not "already".
    [reply] = replies(run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name="vm-b", memory_mb=1)), token=2)))
    assert reply.ok and not reply.already and len(ops(run.host, "start")) == 1


def test_heartbeats_carry_the_ports_boot_id_and_a_growing_seq(tmp_path: Path) -> None:
    host = FakeHost()
    host.boot_id = "boot-from-the-port"
    run = started(tmp_path, host)
    for _ in range(3):
        run.mono += 0.2
        run.feed(TimerFired("hb"))
    beats = heartbeats(run.effects)
    assert [b.boot_id for b in beats] == ["boot-from-the-port"] * 4  # the first at start, then one per timer
    assert [b.seq for b in beats] == [0, 1, 2, 3]
    assert beats[-1].sent_at == run.now().wall
    # The host was power-cycled: a new boot id from the port, the sequence starts over.
    host.boot_id = "boot-2"
    run.feed(TimerFired("hb"))  # sees the new boot: the old boot's VMs are gone, the host boots
    run.feed(TimerFired("hb"))
    assert [(b.boot_id, b.seq) for b in heartbeats(run.effects)][-1] == ("boot-2", 0)


def test_an_inventory_is_published_on_change_and_not_at_every_poll(tmp_path: Path) -> None:
    run = started(tmp_path, FakeHost(running=("vm-a",)))
    [first] = inventories(run.effects)
    assert first.boot_id == "boot-1" and [(v.spec.name, v.state) for v in first.vms] == [("vm-a", "running")]
    assert first.quarantined
    run.mono += 0.2
    assert inventories(run.feed(TimerFired("inv"))) == []  # nothing changed, not due
    run.host.running.discard("vm-a")  # the VM stopped by itself
    run.mono += 0.2
    [changed] = inventories(run.feed(TimerFired("inv")))
    assert [(v.spec.name, v.state, v.stop_reason) for v in changed.vms] == [("vm-a", "stopped", "other")]
    # Nothing changes, but the inventory interval passed: published again.
    run.mono += 30.0
    assert len(inventories(run.feed(TimerFired("inv")))) == 1


def test_a_command_the_agent_ran_publishes_its_inventory_at_once(tmp_path: Path) -> None:
    run = started(tmp_path)
    effects = run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name="vm-a", memory_mb=1)), token=1))
    [inv] = inventories(effects)
    assert [(v.spec.name, v.state) for v in inv.vms] == [("vm-a", "running")]


def test_starts_run_up_to_the_bound_and_one_at_a_time_per_vm(tmp_path: Path) -> None:
    run = started(tmp_path, extra="[agent]\nmax_parallel_starts = 2\n")
    run.host.hold.add("start")
    for token, name in enumerate(["vm-a", "vm-a", "vm-b", "vm-c"], start=1):
        run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name=name, memory_mb=1)), token=token))
    assert [c.args[0].name for c in run.host.held] == ["vm-a", "vm-b"]  # the bound; vm-a's second waits
    effects = run.release("start")
    answered = {e.token: e.message for e in effects if isinstance(e, Reply)}
    assert answered[1].ok and not answered[1].already  # type: ignore[union-attr]
    assert answered[2].already  # type: ignore[union-attr]  # asked again while it booted: already running
    assert answered[3].ok and answered[4].ok  # type: ignore[union-attr]
    assert [c.args[0].name for c in ops(run.host, "start")] == ["vm-a", "vm-b", "vm-c"]


def test_a_powered_off_host_answers_nothing_and_boots_again_quarantined(tmp_path: Path) -> None:
    run = started(tmp_path, FakeHost(running=("vm-a",)))
    run.feed(Delivered("cleared", "hafence.host.h1.cleared",
                       HostEvent(host="h1", kind="cleared", at=0.0, boot_id="boot-1")))
    assert not inventories(run.effects)[-1].quarantined
    run.host.on = False
    run.feed(TimerFired("hb"))
    assert len(ops(run.host, "stop_all")) == 1
    assert replies(run.feed(Asked("cmd", CMD, VmStop(vm="vm-a"), token=3))) == []
    assert [e for e in run.effects if isinstance(e, Reply) and e.token == 3] == [Reply(3, None)]
    run.host.on, run.host.boot_id = True, "boot-2"
    run.feed(TimerFired("hb"))
    assert [c.op for c in run.host.calls if c.op in ("boot", "disable_autostart")][-2:] == [
        "boot", "disable_autostart"]
    last = inventories(run.effects)[-1]
    assert last.boot_id == "boot-2" and last.quarantined
    # A "cleared" for the old boot does not lift the new boot's quarantine.
    assert inventories(run.feed(Delivered("cleared", "hafence.host.h1.cleared",
                                          HostEvent(host="h1", kind="cleared", at=0.0, boot_id="boot-1")))) == []


def test_a_poison_pill_stops_every_vm_and_is_reported(tmp_path: Path) -> None:
    run = Run(AgentCore(config(tmp_path), "h1", watchdog=True), FakeHost(running=("vm-a", "vm-b")))
    run.feed(Started())
    effects = run.feed(Returned("wd:changed", value=WatchdogStatus(pill=True)))
    assert len(ops(run.host, "stop_all")) == 1
    inv = inventories(effects)[-1]
    assert inv.pill and inv.quarantined
    # "pill", not "command": nobody chose these stops; the fence's confirmation releases them.
    assert {(v.spec.name, v.stop_reason) for v in inv.vms} == {("vm-a", "pill"), ("vm-b", "pill")}


def test_a_command_runs_in_a_span_under_the_askers_trace_even_when_it_waited_for_a_slot(tmp_path: Path) -> None:
    from hafence.core import Span

    run = started(tmp_path, extra="[agent]\nmax_parallel_starts = 1\n")
    run.host.hold.add("start")
    first = {"traceparent": "00-" + "a" * 32 + "-" + "1" * 16 + "-01"}
    second = {"traceparent": "00-" + "b" * 32 + "-" + "2" * 16 + "-01"}
    run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name="vm-a", memory_mb=1)), token=1, headers=first))
    run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name="vm-b", memory_mb=1)), token=2, headers=second))
    effects = run.release("start")  # vm-a done: vm-b runs now, in a later handle
    [span] = [e for e in effects if isinstance(e, Span)]
    assert span.name == "agent start vm vm-b" and span.parent == second
    calls = [e for e in effects if isinstance(e, Call)]
    assert effects.index(span) < effects.index(next(c for c in calls if c.tag == "cmd:2:power"))


def test_an_agent_started_on_a_host_that_is_off_renews_and_reports_nothing(tmp_path: Path) -> None:
    host = FakeHost(running=("vm-a",))
    host.on = False
    run = Run(AgentCore(config(tmp_path), "h1", storage_lease=True), host)
    run.feed(Started())
    assert [c for c in host.calls if c.port == "storage"] == []
    assert inventories(run.effects) == [] and heartbeats(run.effects) == []
    assert len(ops(host, "stop_all")) == 1


# --- coalesced inventories ([agent] inventory_coalesce_s) ---------------------------------

def start(run: Run, token: int, name: str) -> list[Effect]:
    return run.feed(Asked("cmd", CMD, VmStart(vm=VmSpec(name=name, memory_mb=1)), token=token))


def answer_one(run: Run, name: str) -> list[Effect]:
    """Answer the held start of one VM (the others stay held)."""
    [call] = [c for c in run.host.held if c.op == "start" and c.args[0].name == name]
    run.host.held.remove(call)
    return run.feed(Returned(call.tag, value=run.host.answer(call)))


def running_in(inv: Inventory) -> set[str]:
    return {v.spec.name for v in inv.vms if v.state == "running"}


def flush_timers(effects: list[Effect]) -> list[SetTimer]:
    return [e for e in effects if isinstance(e, SetTimer) and e.key == "inv:flush"]


NAMES = [f"vm-{i:02d}" for i in range(20)]


def test_a_burst_of_starts_publishes_one_inventory_with_every_vm_and_every_reply_at_once(tmp_path: Path) -> None:
    """A 50-VM failover sent one inventory per start (each stored, decoded by the
    scheduler and the arbiter): the burst's starts are reported together when it drains."""
    run = started(tmp_path, extra="[agent]\nmax_parallel_starts = 4\n")
    run.host.hold.add("start")
    for token, name in enumerate(NAMES, start=1):
        start(run, token, name)
    before = len(inventories(run.effects))
    effects = run.release("start")  # each start done dispatches the next waiting one
    invs = inventories(effects)
    assert len(invs) == 1 and len(inventories(run.effects)) == before + 1
    assert running_in(invs[-1]) == set(NAMES)
    # Every reply went out, the inventory only after the last of them: nothing waited for it.
    assert sorted(r.vm for r in replies(effects)) == NAMES and all(r.ok for r in replies(effects))
    last_reply = max(i for i, e in enumerate(effects) if isinstance(e, Reply))
    assert effects.index(next(e for e in effects if isinstance(e, Publish) and isinstance(e.message, Inventory))) \
        > last_reply
    assert not run.core.held


def test_a_burst_that_does_not_drain_is_reported_at_the_bound_set_once(tmp_path: Path) -> None:
    run = started(tmp_path, extra="[agent]\nmax_parallel_starts = 4\ninventory_coalesce_s = 0.08\n")
    run.host.hold.add("start")
    for token, name in enumerate(NAMES[:4], start=1):
        start(run, token, name)
    effects: list[Effect] = []
    for name in NAMES[:3]:  # the fourth start hangs: the burst does not drain
        one = answer_one(run, name)
        assert [r.vm for r in replies(one)] == [name]  # each reply at once
        effects += one
    assert inventories(effects) == []
    # The bound runs from the first held change and is not pushed back by later ones.
    assert flush_timers(effects) == [SetTimer("inv:flush", 0.08)]
    [inv] = inventories(run.feed(TimerFired("inv:flush")))
    assert running_in(inv) == set(NAMES[:3])
    # The last start, alone now: reported at once.
    [last] = inventories(answer_one(run, NAMES[3]))
    assert running_in(last) == set(NAMES[:4])


def test_a_single_start_is_reported_at_once(tmp_path: Path) -> None:
    run = started(tmp_path)
    effects = start(run, 1, "vm-a")
    [inv] = inventories(effects)
    assert running_in(inv) == {"vm-a"} and flush_timers(effects) == []


def test_zero_keeps_one_inventory_per_start(tmp_path: Path) -> None:
    run = started(tmp_path, extra="[agent]\nmax_parallel_starts = 4\ninventory_coalesce_s = 0\n")
    run.host.hold.add("start")
    for token, name in enumerate(NAMES, start=1):
        start(run, token, name)
    effects = run.release("start")
    assert len(inventories(effects)) == len(NAMES) and flush_timers(effects) == []
    assert running_in(inventories(effects)[-1]) == set(NAMES)


def test_a_stop_is_reported_at_once_during_a_burst_with_the_starts_held_so_far(tmp_path: Path) -> None:
    """A stop's report is never held: the scheduler reads "stopped" to clear a duplicate
    and to find a quarantined host clean, and a stale "running" there is a wrong call."""
    run = started(tmp_path, FakeHost(running=("vm-x",)), extra="[agent]\nmax_parallel_starts = 4\n")
    run.host.hold.add("start")
    for token, name in enumerate(NAMES[:3], start=1):
        start(run, token, name)
    assert inventories(answer_one(run, NAMES[0])) == []  # held: two starts still run
    [inv] = inventories(run.feed(Asked("cmd", CMD, VmStop(vm="vm-x"), token=9)))
    assert running_in(inv) == {NAMES[0]}
    assert ("vm-x", "stopped") in {(v.spec.name, v.state) for v in inv.vms}
    # That report covered the held start: the bound has nothing left to send.
    assert inventories(run.feed(TimerFired("inv:flush"))) == []


def test_a_poll_during_a_burst_reports_the_held_starts(tmp_path: Path) -> None:
    run = started(tmp_path, extra="[agent]\nmax_parallel_starts = 4\n")
    run.host.hold.add("start")
    for token, name in enumerate(NAMES[:3], start=1):
        start(run, token, name)
    answer_one(run, NAMES[0])
    run.mono += 0.2
    [inv] = inventories(run.feed(TimerFired("inv")))
    assert running_in(inv) == {NAMES[0]} and not run.core.held
    assert inventories(run.feed(TimerFired("inv:flush"))) == []
