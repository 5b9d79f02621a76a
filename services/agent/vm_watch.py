"""What the agent says about its VMs' stops (VM-level HA, docs/vm-ha.md).

A *failure* is a stop of a VM the agent saw running, in this boot, that the agent
did not order: the hypervisor calls it crashed, killed (destroyed by someone
else), panicked, or shut down by its guest. The agent reports it in its
inventory (``VmInfo.stop_reason``, ``stopped_at``), where the scheduler reads it;
the scheduler decides whether to restart.

The agent never reports a failure it did not see happen. A VM found stopped at
the agent's start or after a boot has no reason. A stop the agent ordered is
``command``, or ``pill`` when it obeyed a poison pill (the scheduler releases those
at the fence's confirmation as if they ran: docs/watchdog.md), and a stop the
hypervisor does not call a failure (migrated, saved, unknown) is never one, because
a VM migrated away must not be started here again.

``VmWatch`` is pure (VMs and ``now`` in, the report out); the agent core
(``core.py``) logs and counts new failures and publishes the inventory that
carries them in a span of a new trace, the root of the trace of each restart
that follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from hafence.contracts import VM_FAILURES, VM_STOPS, VmInfo


@dataclass(frozen=True, slots=True)
class Failure:
    vm: str
    reason: str
    at: float


class VmWatch:
    def __init__(self) -> None:
        self.running: set[str] = set()  # seen running in this boot
        self.stopped: dict[str, tuple[str, float]] = {}  # seen stop: (reason, when)
        self.ordered: dict[str, str] = {}  # stops this agent is carrying out: their reason

    def reset(self) -> None:
        """A new boot: nothing has been seen running in it."""
        self.running.clear()
        self.stopped.clear()
        self.ordered.clear()

    def started(self, name: str) -> None:
        """A start this agent made: a stop from now on is seen even if it comes before the next look."""
        self.running.add(name)
        self.stopped.pop(name, None)

    def stopping(self, name: str, reason: str = "command") -> None:
        """A stop this agent orders: ``command`` (a hafence command) or ``pill`` (it obeys
        a poison pill: nobody chose to stop the VM, its host is being fenced)."""
        self.ordered[name] = reason

    def stop_done(self, name: str, now: float) -> None:
        reason = self.ordered.pop(name, "command")
        if name in self.running or name not in self.stopped:
            self.running.discard(name)
            self.stopped[name] = (reason, now)
        # else: it had failed before (the scheduler confirms it stopped before moving
        # it): the failure stays what is reported.

    def observe(self, vms: list[VmInfo], now: float) -> tuple[list[VmInfo], list[Failure]]:
        """The VMs as the agent reports them, and the failures seen since the last look."""
        out: list[VmInfo] = []
        failures: list[Failure] = []
        present: set[str] = set()
        for vm in vms:
            name = vm.spec.name
            present.add(name)
            if vm.state == "running":
                self.running.add(name)
                self.stopped.pop(name, None)
                out.append(vm if not vm.stop_reason and not vm.stopped_at
                           else msgspec.structs.replace(vm, stop_reason="", stopped_at=0.0))
                continue
            seen = self.stopped.get(name)
            if seen is None and name in self.running:
                # The hypervisor's word; "pill" is the agent's alone to say.
                said = vm.stop_reason if vm.stop_reason in VM_FAILURES + VM_STOPS[:-1] else "other"
                reason = self.ordered.get(name, said)
                seen = self.stopped[name] = (reason, now)
                if reason in VM_FAILURES:
                    failures.append(Failure(name, reason, now))
            self.running.discard(name)
            reason, at = seen if seen is not None else ("", 0.0)
            out.append(vm if (vm.stop_reason, vm.stopped_at) == (reason, at)
                       else msgspec.structs.replace(vm, stop_reason=reason, stopped_at=at))
        self.running &= present  # undefined meanwhile: forget
        for name in [n for n in self.stopped if n not in present]:
            del self.stopped[name]
        return out, failures

