"""A new heartbeat-monitor leader re-announces what is already suspect, under the
same message id: as it was declared (the silence, last seen, the time of the
declaration), not "no heartbeat for 0.0s" at the time of the take-over."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import msgspec

from hafence.contracts import HostEvent
from hafence.heartbeat.liveness import Liveness
from hafence.heartbeat.service import _emit
from hafence.subjects import Subjects


@dataclass
class RecordingBus:
    subjects: Subjects = field(default_factory=Subjects)
    sent: list[tuple[str, msgspec.Struct, str]] = field(default_factory=list)

    async def publish(self, subject: str, msg: msgspec.Struct, msg_id: str = "") -> None:
        self.sent.append((subject, msg, msg_id))


def test_the_current_suspects_are_as_they_were_declared() -> None:
    core = Liveness(["a", "b"], interval=1.0, missed=3, now=0.0, nonce="n1")
    core.heartbeat("a", "boot7", 1, now=10.0)
    core.heartbeat("b", "boot8", 1, now=12.9)
    [declared] = [s for s in core.tick(now=13.5) if s.host == "a"]
    assert declared.silent_for == 3.5
    # Long after, a new leader asks what is suspect: the same suspicion, not a silence of 0.0 s.
    core.heartbeat("b", "boot8", 2, now=40.0)
    [again] = core.suspects()
    assert again == declared


async def test_a_reannounced_suspect_carries_the_original_silence_and_time() -> None:
    core = Liveness(["a"], interval=1.0, missed=3, now=0.0, nonce="n1")
    core.heartbeat("a", "boot7", 1, now=10.0)
    [first] = core.tick(now=13.5)
    bus, lease, wall_offset = RecordingBus(), SimpleNamespace(term=5), 1_800_000_000.0
    await _emit(bus, core, lease, first, wall_offset)  # type: ignore[arg-type]
    [again] = core.suspects()
    await _emit(bus, core, lease, again, wall_offset)  # type: ignore[arg-type]
    (s1, e1, id1), (s2, e2, id2) = bus.sent
    assert isinstance(e1, HostEvent) and isinstance(e2, HostEvent)
    assert (s1, id1) == (s2, id2) == ("hafence.host.a.suspect", "suspect:a-boot7-1")
    assert e2.reason == e1.reason == "no heartbeat for 3.5s (window 3.0s)"
    assert e2.last_seen == e1.last_seen == wall_offset + 10.0
    assert e2.at == e1.at == wall_offset + 13.5
