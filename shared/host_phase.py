"""The phase of a host: the one state machine, its transitions as a table.

Every rule about how a host's phase moves lives in this file (as h11 keeps its
rules in ``_state.py``). ``step(phase, event)`` returns the next phase, or an
``Illegal`` value naming the pair: the caller keeps its phase, counts the event
and logs it; nothing is dropped silently. The table is total: every (phase,
event) pair is either in ``TRANSITIONS`` or in ``ILLEGAL`` (with why), never
in both (``tests/test_host_phase.py``).

Phases:

* ``unknown``: nothing folded yet. A fold may start anywhere in a history (the
  events stream keeps a bounded number of messages per subject), so every event
  is legal here.
* ``up``: heard, no incident. ``suspect``: the monitor stopped hearing it.
* ``fencing``: a fence request is out. ``fence_failed``: the last one failed
  (retried, then escalated; only a confirmed fence or an operator ends it).
* ``fenced``: confirmed off (by a fencer or an operator), not back yet.
  ``fenced_cleared``: the same, but an operator cleared it in advance (for
  example after removing a poison pill while the host was off).
* ``quarantined``: back on a new boot after its fence, not cleared (S6).
* ``quarantined_suspect``: quarantined, and that later boot went silent: a new
  incident, to be fenced like ``suspect`` (a fence covers one boot, below), and
  still quarantined if it is heard again.

Events are facts the callers derive from the stream: the monitor's ``alive``
(``heard``) and ``suspect``; an inventory from the boot already known
(``reported``) or from another boot (``new_boot``); the monitor's ``suspect``
naming a boot other than the one fenced or being fenced (``new_boot_suspect``,
see ``suspect_event``); the arbiter's ``fence_requested``; a fence result
``confirmed_off``, ``fence_failed`` or ``refused`` (a stale leader's request);
the operator's ``confirmed_fenced`` (``operator_confirmed``) and ``cleared``
(also sent by the scheduler at boot for a host it does not hold in quarantine).

**A host heard again after its fence** (the case the four trackers disagreed on:
the arbiter's policy made it ``up``, the scheduler and this view kept it fenced)
**stays fenced.** Being heard says nothing about which boot is talking: it may be
a heartbeat of the fenced boot still in flight, or the new boot of a host whose
fence was "reboot". Only an inventory from a boot other than the fenced one
moves a fenced host on, and then to ``quarantined``, never to ``up``: a host that
was fenced takes VMs again only after ``cleared`` (S6). For the same reason a
fence in flight or failed is not ended by a heartbeat (the fence has begun:
finishing it is the only state everyone can agree on), and silence does not lift
a quarantine: a quarantined host whose boot goes silent is
``quarantined_suspect`` (below), and heard again, ``quarantined``.

**A fence covers one boot.** A fence request names the boot its incident is
about, and its ``confirmed_off`` releases that boot. When a boot *other* than
the fenced (or being-fenced) one goes silent, that is a new incident, whatever
order its ``new_boot`` and the fence's ``confirmed_off`` were read in: a fenced
or quarantined host whose later boot is suspected is ``quarantined_suspect``
and is fenced again (the power is most likely off already: that fence reads it
off at once, and its result names the later boot, so whatever was started there
is released). Without this rule a host back on a new boot just before an old
incident's fence powered it off (simulation seed 247: VMs placed on that new
boot by the scheduler) stayed ``fenced`` for good, its new boot never fenced,
its VMs never restarted. A fence in flight (or failed and retried) is finished
first: ``new_boot_suspect`` keeps ``fencing``/``fence_failed``, and the caller
keeps the suspicion and steps it again once the fence is confirmed off (a
suspicion of the fenced boot itself, or of an unknown boot, is plain
``suspect``: nothing new is fenced on it).

Who steps it: the arbiter's policy, the scheduler's state (not ``fence_requested``
/``fence_failed``/``refused``: it keeps pending fences per incident beside the
phase, docs/cores.md) and the CLI's cluster view. The heartbeat monitor's
``liveness.py`` is not a phase tracker: it is where ``heard`` and ``suspect``
come from (a host heard or not, per boot, with incident ids); it never sees a
fence, so it keeps its own ``alive/suspect/unknown`` rather than this table.

Maintenance is not a phase: a host in maintenance still has a liveness phase (it
can be suspect, which the arbiter must see to hold its fence, rule 3), so it is a
flag beside the phase, set by ``maintenance_on``/``maintenance_off``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    SUSPECT = "suspect"
    FENCING = "fencing"
    FENCE_FAILED = "fence_failed"
    FENCED = "fenced"
    FENCED_CLEARED = "fenced_cleared"
    QUARANTINED = "quarantined"
    QUARANTINED_SUSPECT = "quarantined_suspect"


class EventKind(StrEnum):
    HEARD = "heard"
    REPORTED = "reported"
    NEW_BOOT = "new_boot"
    SUSPECT = "suspect"
    NEW_BOOT_SUSPECT = "new_boot_suspect"
    FENCE_REQUESTED = "fence_requested"
    REFUSED = "refused"
    CONFIRMED_OFF = "confirmed_off"
    OPERATOR_CONFIRMED = "operator_confirmed"
    FENCE_FAILED = "fence_failed"
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class Illegal:
    """``event`` cannot happen in ``phase``: the caller keeps its phase, counts and logs it."""

    phase: Phase
    event: EventKind
    why: str

    def __str__(self) -> str:
        return f"{self.event} in phase {self.phase}: {self.why}"


P, E = Phase, EventKind

# Events after which the phase is the same whatever it was (given it is legal).
_OFF = {E.CONFIRMED_OFF: P.FENCED, E.OPERATOR_CONFIRMED: P.FENCED, E.FENCE_REQUESTED: P.FENCING}

TRANSITIONS: dict[tuple[Phase, EventKind], Phase] = {
    # Nothing known yet: take each fact as it comes (a fold may start mid-history).
    (P.UNKNOWN, E.HEARD): P.UP,
    (P.UNKNOWN, E.REPORTED): P.UP,
    (P.UNKNOWN, E.NEW_BOOT): P.UP,
    (P.UNKNOWN, E.SUSPECT): P.SUSPECT,
    (P.UNKNOWN, E.NEW_BOOT_SUSPECT): P.SUSPECT,
    (P.UNKNOWN, E.REFUSED): P.UNKNOWN,
    (P.UNKNOWN, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.UNKNOWN, E.CLEARED): P.UNKNOWN,
    **{(P.UNKNOWN, e): p for e, p in _OFF.items()},

    (P.UP, E.HEARD): P.UP,
    (P.UP, E.REPORTED): P.UP,
    (P.UP, E.NEW_BOOT): P.UP,  # rebooted outside any fence: nothing was moved away
    (P.UP, E.SUSPECT): P.SUSPECT,
    (P.UP, E.NEW_BOOT_SUSPECT): P.SUSPECT,
    (P.UP, E.REFUSED): P.UP,  # a stale leader's request: says nothing about the host
    (P.UP, E.FENCE_FAILED): P.FENCE_FAILED,  # its request was before the fold began
    (P.UP, E.CLEARED): P.UP,  # the scheduler's cleared at every boot it does not quarantine
    **{(P.UP, e): p for e, p in _OFF.items()},

    (P.SUSPECT, E.HEARD): P.UP,
    (P.SUSPECT, E.REPORTED): P.SUSPECT,  # the monitor's word decides liveness
    (P.SUSPECT, E.NEW_BOOT): P.SUSPECT,
    (P.SUSPECT, E.SUSPECT): P.SUSPECT,
    (P.SUSPECT, E.NEW_BOOT_SUSPECT): P.SUSPECT,
    (P.SUSPECT, E.REFUSED): P.SUSPECT,
    (P.SUSPECT, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.SUSPECT, E.CLEARED): P.SUSPECT,
    **{(P.SUSPECT, e): p for e, p in _OFF.items()},

    # A fence that has begun is finished: heartbeats, reports, suspicions wait.
    (P.FENCING, E.HEARD): P.FENCING,
    (P.FENCING, E.REPORTED): P.FENCING,
    (P.FENCING, E.NEW_BOOT): P.FENCING,  # "reboot" brought it back before the result was read
    (P.FENCING, E.SUSPECT): P.FENCING,
    # A later boot went silent while this fence runs: the fence (which powers the host off,
    # that boot too) is finished first; the caller keeps the suspicion for after it.
    (P.FENCING, E.NEW_BOOT_SUSPECT): P.FENCING,
    (P.FENCING, E.REFUSED): P.SUSPECT,  # a stale leader's request: the decision is open again
    (P.FENCING, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.FENCING, E.CLEARED): P.FENCING,
    **{(P.FENCING, e): p for e, p in _OFF.items()},

    # Only a confirmed fence (or an operator) ends a failed one; a retry is fencing again.
    (P.FENCE_FAILED, E.HEARD): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.REPORTED): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.NEW_BOOT): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.SUSPECT): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.NEW_BOOT_SUSPECT): P.FENCE_FAILED,  # as in fencing: after the retried fence
    (P.FENCE_FAILED, E.REFUSED): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.CLEARED): P.FENCE_FAILED,
    **{(P.FENCE_FAILED, e): p for e, p in _OFF.items()},

    # Heard again after its fence: still fenced (see the docstring). A new boot: quarantined.
    (P.FENCED, E.HEARD): P.FENCED,
    (P.FENCED, E.REPORTED): P.FENCED,  # a late report of the fenced boot
    (P.FENCED, E.NEW_BOOT): P.QUARANTINED,
    (P.FENCED, E.SUSPECT): P.FENCED,
    # A boot after the fenced one exists (quarantined) and went silent: a new incident (seed 247).
    (P.FENCED, E.NEW_BOOT_SUSPECT): P.QUARANTINED_SUSPECT,
    (P.FENCED, E.REFUSED): P.FENCED,
    (P.FENCED, E.CLEARED): P.FENCED_CLEARED,
    **{(P.FENCED, e): p for e, p in _OFF.items()},

    (P.FENCED_CLEARED, E.HEARD): P.FENCED_CLEARED,
    (P.FENCED_CLEARED, E.REPORTED): P.FENCED_CLEARED,
    (P.FENCED_CLEARED, E.NEW_BOOT): P.UP,  # cleared in advance: back and free
    (P.FENCED_CLEARED, E.SUSPECT): P.FENCED_CLEARED,
    (P.FENCED_CLEARED, E.NEW_BOOT_SUSPECT): P.SUSPECT,  # cleared in advance: its later boot is free, and silent
    (P.FENCED_CLEARED, E.REFUSED): P.FENCED_CLEARED,
    (P.FENCED_CLEARED, E.CLEARED): P.FENCED_CLEARED,
    **{(P.FENCED_CLEARED, e): p for e, p in _OFF.items()},
    # The same confirmation read twice (the fencer's result, the arbiter's event): the
    # early clear stays. A new fence goes through fence_requested.
    (P.FENCED_CLEARED, E.CONFIRMED_OFF): P.FENCED_CLEARED,

    # Back after its fence: nothing but cleared lifts it (S6); a new fence may start.
    (P.QUARANTINED, E.HEARD): P.QUARANTINED,
    (P.QUARANTINED, E.REPORTED): P.QUARANTINED,
    (P.QUARANTINED, E.NEW_BOOT): P.QUARANTINED,
    (P.QUARANTINED, E.SUSPECT): P.QUARANTINED,  # the fenced boot's (a late or second name of its outage)
    (P.QUARANTINED, E.NEW_BOOT_SUSPECT): P.QUARANTINED_SUSPECT,  # its later boot went silent: fence it
    (P.QUARANTINED, E.REFUSED): P.QUARANTINED,
    (P.QUARANTINED, E.FENCE_FAILED): P.FENCE_FAILED,  # its request was folded elsewhere
    (P.QUARANTINED, E.CLEARED): P.UP,
    **{(P.QUARANTINED, e): p for e, p in _OFF.items()},
    # Its fence's confirmation read a second time after the new boot reported ("reboot"):
    # still quarantined, not fenced again. A new fence goes through fence_requested.
    (P.QUARANTINED, E.CONFIRMED_OFF): P.QUARANTINED,

    # Quarantined and its later boot silent: fenced like suspect, still quarantined if heard.
    # The caller drops a confirmation of the boot fenced before (it names that boot) before
    # stepping: a confirmed_off here is the later boot's fence.
    (P.QUARANTINED_SUSPECT, E.HEARD): P.QUARANTINED,
    (P.QUARANTINED_SUSPECT, E.REPORTED): P.QUARANTINED_SUSPECT,  # the monitor's word decides liveness
    (P.QUARANTINED_SUSPECT, E.NEW_BOOT): P.QUARANTINED_SUSPECT,
    (P.QUARANTINED_SUSPECT, E.SUSPECT): P.QUARANTINED_SUSPECT,
    (P.QUARANTINED_SUSPECT, E.NEW_BOOT_SUSPECT): P.QUARANTINED_SUSPECT,
    (P.QUARANTINED_SUSPECT, E.REFUSED): P.QUARANTINED_SUSPECT,
    (P.QUARANTINED_SUSPECT, E.FENCE_FAILED): P.FENCE_FAILED,  # its request was folded elsewhere
    (P.QUARANTINED_SUSPECT, E.CLEARED): P.SUSPECT,  # the quarantine is lifted; the suspicion stays
    **{(P.QUARANTINED_SUSPECT, e): p for e, p in _OFF.items()},
}

# Pairs that cannot happen in a sound cluster: each says why it is counted and logged.
ILLEGAL: dict[tuple[Phase, EventKind], str] = {
    (P.FENCED, E.FENCE_FAILED): "a fence failed for a host already confirmed off, with no new request",
    (P.FENCED_CLEARED, E.FENCE_FAILED): "a fence failed for a host already confirmed off, with no new request",
}


# Phases in which a suspicion is decided by the arbiter's rules (fenced unless held).
SUSPECT_PHASES = (P.SUSPECT, P.QUARANTINED_SUSPECT)


def suspect_event(named_boot: str, covered_boot: str) -> EventKind:
    """The event of a ``suspect`` naming ``named_boot``, for a host whose fence (done,
    or in flight) is about ``covered_boot`` ("" if none, or not known):
    ``new_boot_suspect`` when both are known and differ (a fence covers one boot),
    else ``suspect``."""
    if named_boot and covered_boot and named_boot != covered_boot:
        return E.NEW_BOOT_SUSPECT
    return E.SUSPECT


def step(phase: Phase, event: EventKind) -> Phase | Illegal:
    """The phase after ``event``, or ``Illegal`` (the caller keeps ``phase``, counts, logs)."""
    nxt = TRANSITIONS.get((phase, event))
    if nxt is not None:
        return nxt
    return Illegal(phase, event, ILLEGAL.get((phase, event), "not in the transition table"))
