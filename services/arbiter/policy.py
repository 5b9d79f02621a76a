"""The arbiter's safety policy: when a suspect host may be fenced.

Events in (suspect, alive, fence requested, fence result, maintenance, operator
confirmation), time and the storage leases as arguments, decisions out, each
with its reason. No I/O, no clock.

Rules, in the order they are checked for each suspect host:

1. start-up grace: nothing is decided until one detection window has passed
   since the arbiter started (it must have seen a full window of events);
2. settle: hosts lost together must be seen together before any is fenced.
   The monitor reports, with each suspect, the other hosts it had not heard
   from for a while at that moment (``late``): they count as lost at once (rule
   4), until they are heard again or ``late_horizon_s`` (one detection window)
   has passed, and such a suspect is decided at once. A suspect reported
   without that list (a monitor taking over re-announces its suspects) waits
   ``settle_s``, so that the others have time to become suspect too. In a
   two-host cluster every suspect waits at least ``two_host_delay_s``, so that
   two halves of a split do not fence each other at the same moment;
3. maintenance: a host in maintenance is never fenced;
4. storm guard: if more than ``storm_share`` of the (non-maintenance) hosts
   were lost within ``storm_window_s`` (suspect, being fenced, fenced in that
   window: fencing the first host of a storm must not make room to fence the
   next; or reported late with a suspect, rule 2), the network or the monitor
   is sick, not the hosts: nobody is fenced, an alert is raised, and fencing
   resumes when the share drops;
5. isolation: a host still renewing its storage lease is alive on the storage
   it shares with its VMs; it is isolated from the network, not dead. With
   ``isolated_action = "skip"`` (the default) it is not fenced, and an alert
   is raised; with ``"pill"`` it is fenced through its watchdog levels only (the
   poison pill in its slot on shared storage: it resets itself, docs/watchdog.md);
6. concurrency: at most ``max_concurrent`` fences in flight; the rest wait.

A host's phase moves only through ``hafence.host_phase`` (the one state machine,
a table, shared with the cluster view, the scheduler and the CLI): each method
below turns its fact into a ``host_phase.EventKind`` and steps. An event that is
illegal in the host's phase leaves the phase as it was and is counted
(``Policy.illegal``) and kept for the core to log (``Policy.take_illegal``).
What only the arbiter needs (incident, request id, attempts, retry clock, storm
guard clocks, maintenance) stays beside the phase in ``HostView``.

How the phases decide: ``suspect`` is decided by the rules below; ``fencing`` is
in flight; ``fence_failed`` is retried, then escalated; ``fenced``,
``fenced_cleared`` and ``quarantined`` are never fenced again on a suspicion of
the boot that was fenced: a host heard again after its fence stays fenced (the
heartbeat may be the fenced boot's, still in flight), a new boot of it is
quarantined (it runs no VMs), and only ``cleared`` (S6) makes it ``up``, and
fenceable, again. But a fence covers one boot: a suspicion naming a *later* boot
(``host_phase.suspect_event``) is a new incident, ``quarantined_suspect``,
decided like ``suspect`` (simulation seed 247); one read while a fence of an
earlier boot is in flight or failed is kept (``HostView.later``) and opened
once that fence is confirmed off, unless the host is heard again meanwhile. A
host that comes back while its fence is in flight is still fenced: the fence has
begun, and finishing it is the only state everyone can agree on.

A failed fence is tried again (a new request id per attempt) after a growing
back-off, ``fence_attempts`` times in all; then the host is escalated: its VMs
stay down, and an alert is repeated every ``alert_repeat_s`` until a fence
succeeds or an operator confirms by hand that the host is off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hafence import host_phase
from hafence.host_phase import SUSPECT_PHASES, EventKind, Illegal, Phase, suspect_event

Rule = Literal["maintenance", "storm", "isolated", "concurrency", "escalated"]


@dataclass(frozen=True, slots=True)
class RequestFence:
    host: str
    incident: str
    request_id: str
    reason: str
    attempt: int = 1
    # "watchdog": only the host's watchdog levels (isolation response "pill").
    method: str = "topology"


@dataclass(frozen=True, slots=True)
class SkipFence:
    """The host is not fenced (now), for ``rule``; ``alert`` asks a person to look."""

    host: str
    incident: str
    reason: str
    rule: Rule
    alert: bool = False


Decision = RequestFence | SkipFence


def request_id(incident: str, attempt: int, refusals: int = 0) -> str:
    base = f"fence-{incident}" if attempt == 1 else f"fence-{incident}-a{attempt}"
    # A re-issue after a refusal is a new request: the fencer never answers or runs
    # one request id twice, and the stream drops a repeated message id.
    return f"{base}-r{refusals}" if refusals else base


# Confirmed off and not cleared back to up: never fenced again on a suspicion of the
# boot that was fenced (a later boot's suspicion is a new incident: quarantined_suspect).
OFF_PHASES = (Phase.FENCED, Phase.FENCED_CLEARED, Phase.QUARANTINED)
# Phases left by a cleared (or cleared-in-advance) host: its next fence names its own boot.
_QUARANTINE_PHASES = (Phase.QUARANTINED, Phase.FENCED_CLEARED, Phase.QUARANTINED_SUSPECT)


@dataclass(frozen=True, slots=True)
class LaterSuspect:
    """A suspicion of a boot other than the one being fenced, read while that fence was
    in flight (or failed): opened as its own incident once the fence is confirmed off."""

    incident: str
    at: float
    late: tuple[str, ...] | None
    boot_id: str


@dataclass(slots=True)
class HostView:
    # Config hosts are known: up until told otherwise (every event is legal in up).
    phase: Phase = Phase.UP
    incident: str = ""
    since: float = 0.0
    request_id: str = ""
    attempt: int = 0
    retry_at: float = 0.0
    maintenance: bool = False
    # The rule that last held this host back, and when it was last announced.
    held_by: str = ""
    announced_at: float = float("-inf")
    outcome_reason: str = ""
    # When the host was last lost (declared suspect): the storm guard's clock.
    lost_at: float = float("-inf")
    # When the monitor last reported it late along with another host's suspicion.
    late_at: float = float("-inf")
    # The suspicion came with the monitor's list of late hosts: no settle wait.
    informed: bool = False
    # Requests of this incident the fencer refused (each re-issue gets a new id).
    refusals: int = 0
    # The boot its inventories last came from, the boot its suspicion named, and
    # the boot that was fenced (S6: any other boot reporting after a fence is new).
    boot_id: str = ""
    suspect_boot: str = ""
    fenced_boot: str = ""
    # A later boot's suspicion kept while a fence of an earlier boot runs (host_phase:
    # a fence covers one boot); dropped when the host is heard again.
    later: LaterSuspect | None = None
    # Requests whose result (confirmed off or failed) was folded, newest last: the fencer
    # never runs one request id twice and answers it again under the same message id,
    # which the stream drops, so no result of them can come any more. A fence_requested
    # of one, read after its result (its publish retried after a lost ack, seed 527),
    # does not put the host back in flight.
    finished: list[str] = field(default_factory=list)


# Finished request ids kept per host (a few incidents' attempts).
FINISHED_KEPT = 8


@dataclass
class Policy:
    hosts: Iterable[str]
    detection_window_s: float
    started_at: float
    settle_s: float = 0.0
    max_concurrent: int = 4
    storm_share: float = 0.5
    storm_window_s: float = 60.0
    two_host_delay_s: float = 0.0
    isolated_action: Literal["skip", "fence", "pill"] = "skip"
    fence_attempts: int = 3
    retry_backoff_s: float = 15.0
    alert_repeat_s: float = 300.0
    # How long a host reported late counts as lost (default: one detection window;
    # had it died, it would have been suspect by then).
    late_horizon_s: float | None = None
    views: dict[str, HostView] = field(init=False)
    # Events illegal in their host's phase, by "<event> in <phase>" (the phase stayed).
    illegal: dict[str, int] = field(init=False, default_factory=dict)
    # Illegal events not yet taken for logging: (host, what).
    illegal_pending: list[tuple[str, Illegal]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.views = {h: HostView() for h in self.hosts}

    # --- the phase ------------------------------------------------------------

    def _step(self, host: str, view: HostView, kind: EventKind) -> bool:
        """Move ``view``'s phase by the table (through the module: one state machine).
        False when ``kind`` is illegal in its phase: the phase stays, it is counted and kept."""
        nxt = host_phase.step(view.phase, kind)
        if isinstance(nxt, Illegal):
            key = f"{nxt.event} in {nxt.phase}"
            self.illegal[key] = self.illegal.get(key, 0) + 1
            self.illegal_pending.append((host, nxt))
            return False
        if view.phase in _QUARANTINE_PHASES and nxt in (Phase.UP, Phase.SUSPECT):
            view.fenced_boot = ""  # cleared: its next fence names its own boot
        view.phase = nxt
        return True

    def take_illegal(self) -> list[tuple[str, Illegal]]:
        """The illegal events since the last call (for the core to log)."""
        out, self.illegal_pending = self.illegal_pending, []
        return out

    def _fenced(self, host: str, view: HostView, boot_id: str) -> None:
        if view.phase == Phase.FENCED:
            view.fenced_boot = boot_id or view.suspect_boot or view.boot_id
        later, view.later = view.later, None
        if later is not None and later.boot_id != view.fenced_boot:
            # A later boot went silent while this fence ran: its own incident, now.
            self.suspect(host, later.incident, later.at, later.late, boot_id=later.boot_id)

    def boot_of(self, host: str, incident: str) -> str:
        """The boot ``incident`` of ``host`` is about, as the policy knows it ("" if not
        its current incident nor a later boot's suspicion kept for after a fence)."""
        view = self.views.get(host)
        if view is None or not incident:
            return ""
        if view.incident == incident:
            return view.suspect_boot
        if view.later is not None and view.later.incident == incident:
            return view.later.boot_id
        return ""

    @staticmethod
    def covered_boot(view: HostView) -> str:
        """The boot the host's fence is about ("" when none, or not known): the one
        fenced, or, while a fence is in flight or failed, the one its incident named."""
        if view.phase in (Phase.FENCING, Phase.FENCE_FAILED):
            return view.suspect_boot
        if view.phase in (*OFF_PHASES, Phase.QUARANTINED_SUSPECT):
            return view.fenced_boot
        return ""

    # --- events in ----------------------------------------------------------

    def suspect(self, host: str, incident: str, now: float, late: Iterable[str] | None = None,
                boot_id: str = "") -> None:
        """``late``: the other hosts the monitor had not heard from when it declared
        this one (None: not reported; the suspect then settles, rule 2)."""
        view = self.views[host]
        if view.incident == incident and view.phase != Phase.UP:
            return  # the same incident seen again (a replay, another replica)
        was = view.phase
        kind = suspect_event(boot_id, self.covered_boot(view))
        if not self._step(host, view, kind):
            return
        if kind == EventKind.NEW_BOOT_SUSPECT and view.phase in (Phase.FENCING, Phase.FENCE_FAILED):
            # A fence covers one boot: this later one is fenced after the fence under way.
            view.later = LaterSuspect(incident, now, None if late is None else tuple(late), boot_id)
            return
        if view.phase not in SUSPECT_PHASES:
            # An unresolved fence is not superseded by a new suspicion, and a host fenced
            # (or quarantined) is not fenced again on a suspicion of the fenced boot.
            return
        if was == view.phase and view.incident == incident:
            return
        view.incident, view.since, view.lost_at = incident, now, now
        view.held_by, view.request_id, view.attempt, view.refusals = "", "", 0, 0
        # A suspicion naming no boot (a restarted monitor's "never seen") is about the boot
        # the host last reported: its fence request names it, so its result says which
        # boot was seen off (seeds 613, 680: a boot-less result of a second name for an
        # outage could not be tied to the first name's boot by anyone reading the stream).
        view.suspect_boot = boot_id or view.boot_id
        view.informed = late is not None
        for other in late or ():
            if other != host and other in self.views:
                self.views[other].late_at = now

    def alive(self, host: str) -> None:
        view = self.views[host]
        view.late_at = float("-inf")  # heard again: not late any more
        view.later = None  # and a later boot's suspicion is over (it is suspected again if it goes silent)
        # A fence that has begun is finished, and a fenced host stays fenced (host_phase).
        if self._step(host, view, EventKind.HEARD) and view.phase == Phase.UP:
            view.held_by = ""

    def inventory(self, host: str, boot_id: str) -> None:
        """An inventory: from the boot last known (``reported``) or another (``new_boot``)."""
        view = self.views[host]
        if view.fenced_boot and boot_id == view.fenced_boot:
            kind = EventKind.REPORTED  # a late report from the boot that was fenced
        else:
            # After a fence, any boot but the fenced one is new (an unknown fenced boot
            # included: quarantine is the safe side, S6), as the cluster view folds it.
            off = view.phase in (Phase.FENCED, Phase.FENCED_CLEARED)
            new = off or (bool(view.boot_id) and boot_id != view.boot_id)
            kind = EventKind.NEW_BOOT if new else EventKind.REPORTED
        if self._step(host, view, kind):
            view.boot_id = boot_id
            if view.phase == Phase.UP:
                view.held_by = ""

    def cleared(self, host: str) -> None:
        """An operator's (or the scheduler's) ``cleared``: a quarantined host is up again (S6)."""
        view = self.views[host]
        if self._step(host, view, EventKind.CLEARED) and view.phase == Phase.UP:
            view.held_by = ""

    def fence_requested(self, host: str, incident: str, request: str, now: float, attempt: int = 1) -> None:
        view = self.views[host]
        if request in view.finished:
            return  # its result was read already: nothing more will come of it
        if view.request_id == request and view.phase in (Phase.FENCING, Phase.FENCE_FAILED, *OFF_PHASES):
            if view.phase == Phase.FENCING:
                # Sent again (a new leader's re-issue): its deadline counts from the last send.
                view.since = max(view.since, now)
            return
        if not self._step(host, view, EventKind.FENCE_REQUESTED):
            return
        view.incident, view.request_id, view.since, view.held_by = incident, request, now, ""
        view.attempt = max(view.attempt, attempt)

    def fence_result(self, host: str, request: str, outcome: str, reason: str, now: float,
                     boot_id: str = "", incident: str = "") -> None:
        """``boot_id``: the boot the request was about (the one fenced), when known;
        ``incident``: the request's incident, when known."""
        view = self.views[host]
        if outcome == "refused":
            # A stale leader's request. If that was the only request for this fence,
            # the decision is open again, for whoever leads now (with its own term).
            if view.request_id == request and self._step(host, view, EventKind.REFUSED) \
                    and view.phase == Phase.SUSPECT:
                view.held_by, view.attempt = "", max(0, view.attempt - 1)
                view.refusals += 1
            return
        if request not in view.finished:
            view.finished.append(request)
            del view.finished[:-FINISHED_KEPT]
        if view.request_id and view.request_id != request:
            return
        if outcome == "confirmed_off":
            if view.phase == Phase.QUARANTINED_SUSPECT and (
                    (incident and incident != view.incident) or (boot_id and boot_id == view.fenced_boot)):
                return  # the earlier fence's confirmation read again: not this later boot's
            if self._step(host, view, EventKind.CONFIRMED_OFF):
                view.request_id, view.outcome_reason = request, reason
                self._fenced(host, view, boot_id)
            return
        if self._step(host, view, EventKind.FENCE_FAILED):
            view.request_id, view.outcome_reason = request, reason
            view.retry_at = now + self.retry_backoff_s * (2 ** max(0, view.attempt - 1))
            view.held_by = ""

    def confirmed_by_operator(self, host: str, boot_id: str = "") -> None:
        view = self.views[host]
        if self._step(host, view, EventKind.OPERATOR_CONFIRMED):
            view.held_by = ""
            self._fenced(host, view, boot_id)

    def set_maintenance(self, host: str, on: bool) -> None:
        self.views[host].maintenance = on

    # --- decisions out ------------------------------------------------------

    def in_flight(self) -> list[str]:
        return [h for h, v in self.views.items() if v.phase == Phase.FENCING]

    def decide(self, now: float, storage_live: Mapping[str, bool] | None = None) -> list[Decision]:
        """``storage_live[host]`` is True when the host renewed its storage lease
        within the live window (absent: unknown, treated as not live)."""
        if now < self.started_at + self.detection_window_s:
            return []
        storage_live = storage_live or {}
        watched = [v for v in self.views.values() if not v.maintenance]
        horizon = self.detection_window_s if self.late_horizon_s is None else self.late_horizon_s
        # Fenced (and then cleared in advance, or back quarantined) in the window still
        # counts: fencing the first host of a storm must not make room for the next.
        lost = [v for v in watched if v.phase in (*SUSPECT_PHASES, Phase.FENCING)
                or (v.phase in (Phase.FENCE_FAILED, *OFF_PHASES) and now - v.lost_at <= self.storm_window_s)
                or (v.phase in (Phase.UP, Phase.UNKNOWN) and now - v.late_at <= horizon)]
        share = len(lost) / len(watched) if watched else 0.0
        slots = self.max_concurrent - len(self.in_flight())
        split = self.two_host_delay_s if len(self.views) == 2 else 0.0
        settle = max(self.settle_s, split)
        out: list[Decision] = []
        ready = sorted(
            ((h, v) for h, v in self.views.items()
             if (v.phase in SUSPECT_PHASES and now - v.since >= (split if v.informed else settle))
             or v.phase == Phase.FENCE_FAILED),
            key=lambda hv: (hv[1].since, hv[0]),
        )
        for host, view in ready:
            if view.phase == Phase.FENCE_FAILED:
                if view.attempt >= self.fence_attempts:
                    self._hold(out, host, view, now, "escalated", alert=True, reason=(
                        f"fencing failed {view.attempt} times ({view.outcome_reason}); its VMs stay down until "
                        f"a fence succeeds or an operator runs: hafence confirm-fenced {host}"
                    ))
                    continue
                if now < view.retry_at:
                    continue
            if view.maintenance:
                self._hold(out, host, view, now, "maintenance", reason="host is in maintenance mode: never fenced")
            elif share > self.storm_share:
                self._hold(out, host, view, now, "storm", alert=True, reason=(
                    f"storm guard: {len(lost)} of {len(watched)} hosts lost within {self.storm_window_s:g}s "
                    f"({share:.0%} > {self.storm_share:.0%}); suspecting the network, not the hosts"
                ))
            elif storage_live.get(host) and self.isolated_action == "skip":
                self._hold(out, host, view, now, "isolated", alert=True, reason=(
                    "host still renews its storage lease: isolated from the network, not dead; not fencing"
                ))
            elif slots <= 0:
                self._hold(out, host, view, now, "concurrency",
                           reason=f"{self.max_concurrent} fences already in flight; waiting for a slot")
            else:
                slots -= 1
                attempt = view.attempt + 1
                why = (f"attempt {attempt} of {self.fence_attempts} after: {view.outcome_reason}"
                       if view.phase == Phase.FENCE_FAILED
                       else f"suspect for {now - view.since:.1f}s; {len(lost)} of {len(watched)} hosts lost")
                # "pill": an isolated host still renewing its storage lease is fenced
                # through its slot: it resets itself (its watchdog levels only).
                pill = bool(storage_live.get(host)) and self.isolated_action == "pill"
                if pill:
                    why += "; isolated (storage lease live): poison pill through its watchdog levels"
                out.append(RequestFence(host, view.incident, request_id(view.incident, attempt, view.refusals), why,
                                        attempt, method="watchdog" if pill else "topology"))
        return out

    def _hold(self, out: list[Decision], host: str, view: HostView, now: float, rule: Rule, reason: str,
              alert: bool = False) -> None:
        """Announce a skip once per rule; alerts again every ``alert_repeat_s``."""
        repeat = alert and now - view.announced_at >= self.alert_repeat_s
        if view.held_by != rule or repeat:
            view.held_by, view.announced_at = rule, now
            out.append(SkipFence(host, view.incident, reason, rule, alert))
