"""The monitor's view, for watchdog self-fencing (docs/watchdog.md).

While it holds the lease, the monitor publishes on ``<prefix>.view.<host>``
(core NATS), for every watchdog host it hears (alive and heard within 1.5
heartbeat intervals), a ``MonitorView`` with its term. An agent that cannot read
its slot on shared storage keeps feeding its watchdog only while such a view is
recent; the fencer's watchdog level counts msgwait from the last one. A suspect
host is never listed, so a host the cluster counts dead has no channel left to
keep itself alive on. One small message per watchdog host per period; each agent
receives only its own. Pure: the core (``core.py``) calls it on its view timer.
"""

from __future__ import annotations

from hafence.config import ClusterConfig
from hafence.contracts import MonitorView
from hafence.core.effects import Publish
from hafence.heartbeat.liveness import Liveness
from hafence.slots import view_subject
from hafence.subjects import Subjects

HEARD_WITHIN_INTERVALS = 1.5


def listed(core: Liveness, hosts: list[str], now: float, interval: float) -> list[str]:
    """The watchdog hosts the monitor hears now (pure)."""
    late = set(core.late(now, HEARD_WITHIN_INTERVALS * interval))
    return [h for h in hosts if core.state(h) == "alive" and h not in late]


def view_period(config: ClusterConfig) -> float:
    """Often enough that a view never ages past ``view_max_age_s`` between two."""
    return min(config.timings.heartbeat_interval_s, config.storage.view_max_age_s / 3)


def watchdog_hosts(config: ClusterConfig, shard_hosts: list[str]) -> list[str]:
    """The hosts of this shard a view is published for: none without a slot directory."""
    if not config.storage.slot_dir:
        return []
    ours = set(shard_hosts)
    return [h.name for h in config.hosts if h.watchdog and h.name in ours]


def views(subjects: Subjects, core: Liveness, hosts: list[str], mono: float, wall: float, interval: float,
          term: int) -> list[Publish]:
    """One view per watchdog host heard now, as core NATS messages (the leader's only)."""
    return [Publish(view_subject(subjects, host), MonitorView(host=host, term=term, at=wall), core=True)
            for host in listed(core, hosts, mono, interval)]

