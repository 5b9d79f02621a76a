"""The arbiter's safety policy: when a suspect host may be fenced.

Events in (suspect, alive, fence requested, fence result, maintenance), time as
an argument, decisions out, each with its reason. No I/O, no clock.

Rules, in the order they are checked for each suspect host:

1. start-up grace: nothing is decided until one detection window has passed
   since the arbiter started (it must have seen a full window of events);
2. settle: a suspect is decided only after it has been suspect for ``settle_s``,
   so that hosts lost together are seen together;
3. maintenance: a host in maintenance is never fenced;
4. storm guard: if more than ``storm_share`` of the (non-maintenance) hosts are
   suspect or being fenced at once, the network or the monitor is sick, not the
   hosts: nobody is fenced, an alert is raised, and fencing resumes when the
   share drops;
5. concurrency: at most ``max_concurrent`` fences in flight; the rest wait.

A host that comes back while its fence is in flight is still fenced: the fence
has begun, and finishing it is the only state everyone can agree on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["up", "suspect", "fencing", "fenced", "fence_failed"]


@dataclass(frozen=True, slots=True)
class RequestFence:
    host: str
    incident: str
    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class SkipFence:
    host: str
    incident: str
    reason: str
    rule: Literal["maintenance", "storm", "concurrency"]


Decision = RequestFence | SkipFence


@dataclass(slots=True)
class HostView:
    phase: Phase = "up"
    incident: str = ""
    since: float = 0.0
    request_id: str = ""
    maintenance: bool = False
    # The rule that last held this host back, so each skip is announced once.
    held_by: str = ""
    outcome_reason: str = ""


@dataclass
class Policy:
    hosts: Iterable[str]
    detection_window_s: float
    started_at: float
    settle_s: float = 0.0
    max_concurrent: int = 4
    storm_share: float = 0.5
    views: dict[str, HostView] = field(init=False)

    def __post_init__(self) -> None:
        self.views = {h: HostView() for h in self.hosts}

    # --- events in ----------------------------------------------------------

    def suspect(self, host: str, incident: str, now: float) -> None:
        view = self.views[host]
        if view.phase in ("fencing",) or (view.phase == "suspect" and view.incident == incident):
            return
        if view.phase in ("fenced", "fence_failed") and view.incident == incident:
            return
        view.phase, view.incident, view.since, view.held_by, view.request_id = "suspect", incident, now, "", ""

    def alive(self, host: str) -> None:
        view = self.views[host]
        if view.phase == "fencing":
            return
        view.phase, view.held_by = "up", ""

    def fence_requested(self, host: str, incident: str, request_id: str, now: float) -> None:
        view = self.views[host]
        if view.phase in ("fenced", "fence_failed") and view.request_id == request_id:
            return
        view.phase, view.incident, view.request_id, view.since, view.held_by = (
            "fencing", incident, request_id, now, ""
        )

    def fence_result(self, host: str, request_id: str, confirmed: bool, reason: str) -> None:
        view = self.views[host]
        if view.request_id and view.request_id != request_id:
            return
        view.phase = "fenced" if confirmed else "fence_failed"
        view.request_id, view.outcome_reason = request_id, reason

    def set_maintenance(self, host: str, on: bool) -> None:
        self.views[host].maintenance = on

    # --- decisions out ------------------------------------------------------

    def in_flight(self) -> list[str]:
        return [h for h, v in self.views.items() if v.phase == "fencing"]

    def decide(self, now: float) -> list[Decision]:
        if now < self.started_at + self.detection_window_s:
            return []
        watched = [v for v in self.views.values() if not v.maintenance]
        lost = [v for v in watched if v.phase in ("suspect", "fencing")]
        share = len(lost) / len(watched) if watched else 0.0
        slots = self.max_concurrent - len(self.in_flight())
        out: list[Decision] = []
        ready = sorted(
            ((h, v) for h, v in self.views.items() if v.phase == "suspect" and now - v.since >= self.settle_s),
            key=lambda hv: (hv[1].since, hv[0]),
        )
        for host, view in ready:
            if view.maintenance:
                rule, reason = "maintenance", "host is in maintenance mode: never fenced"
            elif share > self.storm_share:
                rule = "storm"
                reason = (
                    f"storm guard: {len(lost)} of {len(watched)} hosts lost at once "
                    f"({share:.0%} > {self.storm_share:.0%}); suspecting the network, not the hosts"
                )
            elif slots <= 0:
                rule = "concurrency"
                reason = f"{self.max_concurrent} fences already in flight; waiting for a slot"
            else:
                slots -= 1
                out.append(
                    RequestFence(
                        host, view.incident, f"fence-{view.incident}",
                        f"suspect for {now - view.since:.1f}s; {len(lost)} of {len(watched)} hosts lost",
                    )
                )
                continue
            if view.held_by != rule:
                view.held_by = rule
                out.append(SkipFence(host, view.incident, reason, rule))  # type: ignore[arg-type]
        return out
