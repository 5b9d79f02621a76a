"""Prometheus metrics of every service, served on ``[metrics] port`` (0: off).

Names follow Prometheus conventions (``hafence_`` prefix, ``_total`` counters,
``_seconds`` durations). Label values are host names, outcomes and states:
bounded by the size of the cluster, never by VM count or request ids.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

HEARTBEATS = Counter("hafence_heartbeats_received_total", "Heartbeats received by the monitor", ["host"])
HOSTS = Gauge("hafence_hosts", "Hosts by liveness or fencing state, as this service sees them", ["state"])
FENCES = Counter("hafence_fence_operations_total", "Fence requests finished, by outcome", ["host", "outcome"])
FENCE_SECONDS = Histogram(
    "hafence_fence_duration_seconds", "From a fence request's arrival to its result", ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120),
)
PROTECTED = Gauge("hafence_host_protected", "1 if the host has a complete working fence level", ["host"])
DECISIONS = Counter("hafence_arbiter_decisions_total", "Arbiter decisions, by kind and rule", ["decision", "rule"])
PLACEMENTS = Counter("hafence_vm_starts_total", "VM starts after a fence, by result", ["result"])
PENDING = Gauge("hafence_vms_pending", "HA VMs of fenced hosts not yet running anywhere")
FAILOVER_SECONDS = Histogram(
    "hafence_failover_duration_seconds", "From a host's fence confirmation to its last HA VM started",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
HA_RESERVATION = Gauge("hafence_ha_reservation_ok", "1 if the loss of the largest host could be absorbed")
DEAD_LETTERS = Counter("hafence_dead_letters_total", "Messages sent to the dead-letter stream", ["service"])
LEADER = Gauge("hafence_leader", "1 while this replica holds the role's lease", ["role"])
TERM = Gauge("hafence_leader_term", "The role's lease term held by this replica (0: not leader)", ["role"])


def serve(port: int, address: str = "0.0.0.0") -> None:
    """Start the /metrics endpoint (a daemon thread of prometheus_client)."""
    if port:
        start_http_server(port, addr=address)
