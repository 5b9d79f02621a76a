"""Fence deadlines: a request in flight with no result for too long. Pure.

Without one, a fencer that is down, wedged, or refusing into a de-duplicated
void left the host "fencing" for ever: no ``fence_failed``, no alert, and its
VMs down. Past the deadline the arbiter folds the request as failed, which
alerts, retries with a new request id after the back-off, and escalates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hafence.arbiter.policy import HostView


@dataclass(frozen=True, slots=True)
class Overdue:
    host: str
    incident: str
    request_id: str
    waited_s: float


def overdue(views: Mapping[str, HostView], now: float, deadline_s: float) -> list[Overdue]:
    """Requests in flight (``since``: when the request was sent, or replayed) for longer than the deadline."""
    return [
        Overdue(host, view.incident, view.request_id, now - view.since)
        for host, view in sorted(views.items())
        if view.phase == "fencing" and now - view.since > deadline_s
    ]
