"""Production's NATS permissions, enforced by the simulated server.

``hafence.natsconf.permissions`` is what ``hafence deploy nats-conf`` writes into
nats.conf: per identity, the subjects it may publish on. The simulation gives each
node the grants of the identity production runs there (an agent on its host, a
service on its ``ctl-<role>-<n>`` node), so the compromised agent is kept to its
subjects by the same table production is, not by the fault plan's good manners,
and a service that publishes what its identity may not is denied in the simulation
as it would be in production (``SimNats.denied`` records both).

Only data-plane subjects are granted here: the simulated server's JetStream API
(stream and KV operations) is a set of calls, not subjects, so the ``$JS.``/``$KV.``
grants have nothing to guard. Request replies on ``_INBOX.`` pass, as nats.conf's
``allow_responses`` lets them.
"""

from __future__ import annotations

from collections.abc import Iterable

from hafence.config import ClusterConfig
from hafence.natsconf import permissions

ROLES = ("heartbeat", "arbiter", "fencer", "scheduler")


def identity_of(node: str, hosts: set[str]) -> str:
    """The NATS user production runs on ``node``; '' for a node that has none."""
    if node in hosts:
        return f"agent-{node}"
    if node.startswith("ctl-"):
        role = node[len("ctl-"):].rpartition("-")[0]
        if role in ROLES:
            return role
    return ""


def publish_grants(config: ClusterConfig, nodes: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """node -> the data-plane subjects its identity may publish on."""
    users = permissions(config)
    hosts = {h.name for h in config.hosts}
    grants: dict[str, tuple[str, ...]] = {}
    for node in nodes:
        user = identity_of(node, hosts)
        if user:
            grants[node] = tuple(p for p in users[user]["publish"] if not p.startswith("$"))
    return grants
