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

Events are facts the callers derive from the stream: the monitor's ``alive``
(``heard``) and ``suspect``; an inventory from the boot already known
(``reported``) or from another boot (``new_boot``); the arbiter's
``fence_requested``; a fence result ``confirmed_off``, ``fence_failed`` or
``refused`` (a stale leader's request); the operator's ``confirmed_fenced``
(``operator_confirmed``) and ``cleared`` (also sent by the scheduler at boot for a
host it does not hold in quarantine).

**A host heard again after its fence** (the case the four trackers disagreed on:
the arbiter's policy made it ``up``, the scheduler and this view kept it fenced)
**stays fenced.** Being heard says nothing about which boot is talking: it may be
a heartbeat of the fenced boot still in flight, or the new boot of a host whose
fence was "reboot". Only an inventory from a boot other than the fenced one
moves a fenced host on, and then to ``quarantined``, never to ``up``: a host that
was fenced takes VMs again only after ``cleared`` (S6). For the same reason a
fence in flight or failed is not ended by a heartbeat (the fence has begun:
finishing it is the only state everyone can agree on), and a quarantined host
that goes silent stays quarantined (silence does not lift a quarantine; the
arbiter may fence it again through ``fence_requested``).

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


class EventKind(StrEnum):
    HEARD = "heard"
    REPORTED = "reported"
    NEW_BOOT = "new_boot"
    SUSPECT = "suspect"
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
    (P.UNKNOWN, E.REFUSED): P.UNKNOWN,
    (P.UNKNOWN, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.UNKNOWN, E.CLEARED): P.UNKNOWN,
    **{(P.UNKNOWN, e): p for e, p in _OFF.items()},

    (P.UP, E.HEARD): P.UP,
    (P.UP, E.REPORTED): P.UP,
    (P.UP, E.NEW_BOOT): P.UP,  # rebooted outside any fence: nothing was moved away
    (P.UP, E.SUSPECT): P.SUSPECT,
    (P.UP, E.REFUSED): P.UP,  # a stale leader's request: says nothing about the host
    (P.UP, E.FENCE_FAILED): P.FENCE_FAILED,  # its request was before the fold began
    (P.UP, E.CLEARED): P.UP,  # the scheduler's cleared at every boot it does not quarantine
    **{(P.UP, e): p for e, p in _OFF.items()},

    (P.SUSPECT, E.HEARD): P.UP,
    (P.SUSPECT, E.REPORTED): P.SUSPECT,  # the monitor's word decides liveness
    (P.SUSPECT, E.NEW_BOOT): P.SUSPECT,
    (P.SUSPECT, E.SUSPECT): P.SUSPECT,
    (P.SUSPECT, E.REFUSED): P.SUSPECT,
    (P.SUSPECT, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.SUSPECT, E.CLEARED): P.SUSPECT,
    **{(P.SUSPECT, e): p for e, p in _OFF.items()},

    # A fence that has begun is finished: heartbeats, reports, suspicions wait.
    (P.FENCING, E.HEARD): P.FENCING,
    (P.FENCING, E.REPORTED): P.FENCING,
    (P.FENCING, E.NEW_BOOT): P.FENCING,  # "reboot" brought it back before the result was read
    (P.FENCING, E.SUSPECT): P.FENCING,
    (P.FENCING, E.REFUSED): P.SUSPECT,  # a stale leader's request: the decision is open again
    (P.FENCING, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.FENCING, E.CLEARED): P.FENCING,
    **{(P.FENCING, e): p for e, p in _OFF.items()},

    # Only a confirmed fence (or an operator) ends a failed one; a retry is fencing again.
    (P.FENCE_FAILED, E.HEARD): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.REPORTED): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.NEW_BOOT): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.SUSPECT): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.REFUSED): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.FENCE_FAILED): P.FENCE_FAILED,
    (P.FENCE_FAILED, E.CLEARED): P.FENCE_FAILED,
    **{(P.FENCE_FAILED, e): p for e, p in _OFF.items()},

    # Heard again after its fence: still fenced (see the docstring). A new boot: quarantined.
    (P.FENCED, E.HEARD): P.FENCED,
    (P.FENCED, E.REPORTED): P.FENCED,  # a late report of the fenced boot
    (P.FENCED, E.NEW_BOOT): P.QUARANTINED,
    (P.FENCED, E.SUSPECT): P.FENCED,
    (P.FENCED, E.REFUSED): P.FENCED,
    (P.FENCED, E.CLEARED): P.FENCED_CLEARED,
    **{(P.FENCED, e): p for e, p in _OFF.items()},

    (P.FENCED_CLEARED, E.HEARD): P.FENCED_CLEARED,
    (P.FENCED_CLEARED, E.REPORTED): P.FENCED_CLEARED,
    (P.FENCED_CLEARED, E.NEW_BOOT): P.UP,  # cleared in advance: back and free
    (P.FENCED_CLEARED, E.SUSPECT): P.FENCED_CLEARED,
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
    (P.QUARANTINED, E.SUSPECT): P.QUARANTINED,
    (P.QUARANTINED, E.REFUSED): P.QUARANTINED,
    (P.QUARANTINED, E.FENCE_FAILED): P.FENCE_FAILED,  # its request was folded elsewhere
    (P.QUARANTINED, E.CLEARED): P.UP,
    **{(P.QUARANTINED, e): p for e, p in _OFF.items()},
    # Its fence's confirmation read a second time after the new boot reported ("reboot"):
    # still quarantined, not fenced again. A new fence goes through fence_requested.
    (P.QUARANTINED, E.CONFIRMED_OFF): P.QUARANTINED,
}

# Pairs that cannot happen in a sound cluster: each says why it is counted and logged.
ILLEGAL: dict[tuple[Phase, EventKind], str] = {
    (P.FENCED, E.FENCE_FAILED): "a fence failed for a host already confirmed off, with no new request",
    (P.FENCED_CLEARED, E.FENCE_FAILED): "a fence failed for a host already confirmed off, with no new request",
}


def step(phase: Phase, event: EventKind) -> Phase | Illegal:
    """The phase after ``event``, or ``Illegal`` (the caller keeps ``phase``, counts, logs)."""
    nxt = TRANSITIONS.get((phase, event))
    if nxt is not None:
        return nxt
    return Illegal(phase, event, ILLEGAL.get((phase, event), "not in the transition table"))
