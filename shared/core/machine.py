"""The one shape every service core has."""

from __future__ import annotations

from typing import Protocol

from hafence.core.effects import Effect
from hafence.core.events import Event, Now
from hafence.core.inputs import Inputs


class Core(Protocol):
    """A service's decisions. ``handle`` is pure with respect to the outside
    world: it reads only the event, ``now`` and the core's own state, and returns
    the effects in the order they must be carried out. A core is rebuilt from
    scratch after a crash (its memory is lost; its store and the streams are not)."""

    name: str

    def inputs(self) -> Inputs: ...

    def handle(self, event: Event, now: Now) -> list[Effect]: ...
