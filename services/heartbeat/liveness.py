"""Liveness of hosts: the whole rule set of the heartbeat monitor.

A host is *suspect* once it has missed ``missed`` heartbeat intervals, and
*alive* again when a heartbeat arrives. Time is an argument (a monotonic clock
in the service, a virtual one in tests); nothing here does I/O.

Start-up grace: a host never heard from counts as last seen when the monitor
started, so a freshly started monitor observes one full detection window
before it suspects anybody.

Incident ids are never reused (S4), yet every replica names the same suspicion
the same way where it can, so a new leader's re-announcement is de-duplicated
by the stream:

* a host that was heard from: ``<host>-<boot>-<seq>`` of its last heartbeat. A
  boot id is new at every boot and ``seq`` only grows within one, so the pair
  names one moment of one boot; a heartbeat that does not move it forward (a
  replayed or reordered one) is ignored, so the last one heard never goes back;
* a host never heard from in this monitor's lifetime: ``<host>-never-seen-<nonce>``,
  where ``nonce`` is given by whoever builds the core, new per lifetime (the
  service draws it at random, the simulation from its seed: the core draws no
  randomness of its own). The id itself comes from ``new_incident_id``, always
  looked up in this module (the simulation plants "reuse an incident id" there).
  Without a nonce every lifetime named its silent hosts alike, the stream
  dropped the second suspicion as a duplicate, and the fencer answered the next
  incident from its journal.

Lost heartbeats (L4, read by the load guard through the core): within one boot
an agent numbers its heartbeats 1 by 1 (``seq``), so a heartbeat of the same
boot whose ``seq`` is more than one past the last one processed means that
``seq - last - 1`` heartbeats were sent and never processed: dropped on the way
(a NATS server closing the monitor as a slow consumer, a route doing the same)
or by the monitor's own subscription. They are counted (``lost``, and the hosts
they came from in ``lost_from``; nothing is kept per heartbeat) only when the
gap can be the monitor's loss rather than the host's own silence:

* same boot: a new boot starts its numbering again (and a boot id that changes
  hides a gap: no loss is ever counted across two boots);
* the host was ``alive``: a host back from suspicion was silent for a whole
  detection window, and one never heard from (``unknown``) has no number yet;
* it was last heard at most one detection window ago: a longer silence (a
  partition, a host cut from NATS, an agent that could not publish: its
  numbers are skipped too, see the agent's core) is the host's own. Shorter
  gaps are counted whatever their cause; the load guard reads them as the
  monitor's loss only when they are more than half of what was sent, from
  several senders, over an interval (``load.py``).

A replayed or reordered heartbeat (same boot, ``seq`` not past the last) is
ignored and counts nothing, so a burst of old heartbeats cannot make the next
gap look bigger or smaller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

State = Literal["alive", "suspect", "unknown"]


@dataclass(frozen=True, slots=True)
class Suspect:
    host: str
    incident: str
    last_seen: float
    # How long it had been silent when it was declared (its declaration: last_seen + silent_for).
    silent_for: float
    # The boot it was last heard from ("" if never heard from): the incident is about that boot (S6).
    boot_id: str = ""


@dataclass(frozen=True, slots=True)
class Alive:
    host: str
    was_suspect: bool


Transition = Suspect | Alive


@dataclass(slots=True)
class _Host:
    state: State
    last_seen: float
    boot_id: str = ""
    seq: int = -1
    incident: str = ""
    silent_for: float = 0.0  # when declared suspect


class UnknownHost(KeyError):
    pass


_UNSAFE = re.compile(r"[^A-Za-z0-9]")


def _token(value: str, limit: int) -> str:
    """Part of an id that goes into message ids and headers: the agent's boot id is
    its word, so only letters and digits survive, and a bounded number of them."""
    return _UNSAFE.sub("", value)[:limit] or "none"


def new_incident_id(host: str, boot_id: str, seq: int, nonce: str) -> str:
    """The id of a new suspicion of ``host`` (S4: never reused), derived from what
    was last heard (``seq`` < 0: nothing), so every replica of the monitor names
    the same incident the same way. ``nonce``: the monitor's lifetime, for hosts
    never heard from."""
    last = f"{_token(boot_id, 16)}-{seq}" if seq >= 0 else f"never-seen-{nonce}"
    return f"{host}-{last}"


class Liveness:
    def __init__(self, hosts: Iterable[str], interval: float, missed: int, now: float, *, nonce: str) -> None:
        if interval <= 0 or missed < 1:
            raise ValueError("interval must be > 0 and missed >= 1")
        if not _UNSAFE.sub("", nonce):
            raise ValueError("nonce must hold letters or digits: it keeps never-seen incidents unique")
        self.window = interval * missed
        self.started_at = now
        self.nonce = _token(nonce, 16)
        self._hosts = {h: _Host(state="unknown", last_seen=now) for h in hosts}
        # Heartbeats sent and never processed since the reader last took them, and
        # the hosts they were lost from (see the module's docstring).
        self.lost = 0
        self.lost_from: set[str] = set()

    def heartbeat(self, host: str, boot_id: str, seq: int, now: float) -> list[Transition]:
        entry = self._hosts.get(host)
        if entry is None:
            raise UnknownHost(host)
        was = entry.state
        if boot_id == entry.boot_id:
            last = entry.seq
            if seq <= last:
                return []  # replayed or reordered: not news of life, and the last one heard must not go back
            if seq - last > 1 and was == "alive" and now - entry.last_seen <= self.window:
                self.lost += seq - last - 1
                self.lost_from.add(host)
        entry.state, entry.last_seen, entry.boot_id, entry.seq = "alive", now, boot_id, seq
        if was == "alive":
            return []
        entry.incident = ""
        return [Alive(host, was_suspect=was == "suspect")]

    def tick(self, now: float) -> list[Transition]:
        out: list[Transition] = []
        for host, entry in self._hosts.items():
            silent_for = now - entry.last_seen
            if entry.state != "suspect" and silent_for > self.window:
                entry.state = "suspect"
                # Looked up in the module at every call: the simulation plants
                # "reuse an incident id" by replacing new_incident_id.
                entry.incident = new_incident_id(host, entry.boot_id, entry.seq, self.nonce)
                entry.silent_for = silent_for
                out.append(Suspect(host, entry.incident, entry.last_seen, silent_for, entry.boot_id))
        return out

    def late(self, now: float, after: float) -> list[str]:
        """Hosts not suspect (yet) but unheard for more than ``after``: when a host
        becomes suspect, those were probably lost with it. A view; it changes nothing."""
        return [h for h, e in self._hosts.items() if e.state != "suspect" and now - e.last_seen > after]

    def suspects(self) -> list[Suspect]:
        """The current suspicions as they were declared (a new leader re-announces them
        under the same message id: the same silence, the same boot)."""
        return [
            Suspect(h, e.incident, e.last_seen, e.silent_for, e.boot_id)
            for h, e in self._hosts.items() if e.state == "suspect"
        ]

    def state(self, host: str) -> State:
        return self._hosts[host].state
