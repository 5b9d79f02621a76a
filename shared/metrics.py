"""Prometheus metrics of every service, served on ``[metrics] port`` (0: off).

Names follow Prometheus conventions (``hafence_`` prefix, ``_total`` counters,
``_seconds`` durations). Label values are host names, outcomes and states:
bounded by the size of the cluster, never by VM count or request ids.

Two rules keep the dashboard truthful:

- each service serves only its own metrics (one registry per service), so a
  gauge another service owns never shows up as a default 0 (a fencer would
  otherwise report "HA reservation lost");
- counters and histograms exist from the start for every label value they can
  take (hosts from the config, outcomes and kinds from the contracts' Literal
  types, rules from the arbiter's), so ``increase()`` and ``rate()`` see the
  step from 0 to 1 instead of a series that appears already at 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client import gc_collector as _gc
from prometheus_client import platform_collector as _platform
from prometheus_client import process_collector as _process
from prometheus_client.registry import Collector

from hafence.contracts import FenceOutcome, VmEventKind

if TYPE_CHECKING:
    from hafence.config import ClusterConfig

disable_created_metrics()  # *_created series double the output and no panel or alert reads them

# What a VM start asked by the scheduler came to (the VmEvent kinds of the same name).
StartResult = Literal["started", "failed"]
# What a VM start asked of an agent's hypervisor came to.
AgentStartResult = Literal["started", "already", "failed"]
assert set(get_args(StartResult)) <= set(get_args(VmEventKind))

# --- monitor (heartbeat service) ---
HEARTBEATS = Counter("hafence_heartbeats_received_total", "Heartbeats received by the monitor", ["host"],
                     registry=None)
HOSTS = Gauge("hafence_hosts", "Hosts by liveness or fencing state, as this service sees them", ["state"],
              registry=None)
MONITOR_LAG = Gauge("hafence_monitor_lag_seconds",
                    "How late the monitor's last clock tick ran (a starved event loop or CPU); L4", registry=None)
MONITOR_OVERLOADED = Gauge("hafence_monitor_overloaded",
                           "1 while the monitor suspects nobody because it is itself lagging (L4)", registry=None)

# --- fencer ---
FENCES = Counter("hafence_fence_operations_total", "Fence requests finished, by outcome", ["host", "outcome"],
                 registry=None)
FENCE_SECONDS = Histogram(
    "hafence_fence_duration_seconds", "From a fence request's arrival to its result", ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120), registry=None,
)
PROTECTED = Gauge("hafence_host_protected", "1 if the host has a complete working fence level", ["host"],
                  registry=None)

# --- arbiter ---
DECISIONS = Counter("hafence_arbiter_decisions_total", "Arbiter decisions, by kind and rule", ["decision", "rule"],
                    registry=None)

# --- scheduler ---
PLACEMENTS = Counter("hafence_vm_starts_total", "VM starts after a fence, by result", ["result"], registry=None)
PENDING = Gauge("hafence_vms_pending", "HA VMs of fenced hosts not yet running anywhere", registry=None)
FAILOVER_SECONDS = Histogram(
    "hafence_failover_duration_seconds", "From a host's fence confirmation to its last HA VM started",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=None,
)
HA_RESERVATION = Gauge("hafence_ha_reservation_ok",
                       "1 if the loss of the largest host could be absorbed, 0 if not, NaN before a verdict",
                       registry=None)
VM_EVENTS = Counter("hafence_vm_events_total", "VM events published by the scheduler, by kind (duplicate: S0 watch)",
                    ["kind"], registry=None)
# VM-level HA (docs/vm-ha.md): restarts of HA VMs that failed on a live host.
VmFailure = Literal["crashed", "killed", "panicked", "guest_shutdown"]
RestartWhere = Literal["same_host", "elsewhere"]
RestartResult = Literal["started", "failed", "unanswered"]
VM_RESTARTS = Counter("hafence_vm_restarts_total",
                      "Restarts of HA VMs that failed on a live host, by failure reason, where, and result",
                      ["reason", "where", "result"], registry=None)
VM_RESTART_LIMITS = Counter("hafence_vm_restart_limits_total",
                            "HA VMs no longer restarted (restart limit reached, or no host could start them)",
                            registry=None)

# --- agents ---
AGENT_HEARTBEATS = Counter("hafence_agent_heartbeats_sent_total", "Heartbeats this host's agent published",
                           ["host"], registry=None)
AGENT_VM_STARTS = Counter("hafence_agent_vm_starts_total", "VM starts asked of this host's hypervisor, by result",
                          ["host", "result"], registry=None)
AGENT_VM_FAILURES = Counter("hafence_agent_vm_failures_total",
                            "VMs this host's agent saw stop without an order, by reason", ["host", "reason"],
                            registry=None)
AGENT_POWERED = Gauge("hafence_agent_powered", "1 while the host is powered on (lab: its simulated switch)",
                      ["host"], registry=None)
STORAGE_LEASE = Gauge("hafence_agent_storage_lease_renewed_timestamp_seconds",
                      "When this host last renewed its lease on the shared storage (Unix time)", ["host"],
                      registry=None)

# --- every service ---
DEAD_LETTERS = Counter("hafence_dead_letters_total", "Messages sent to the dead-letter stream", ["service"],
                       registry=None)
LEADER = Gauge("hafence_leader", "1 while this replica holds the role's lease", ["role"], registry=None)
TERM = Gauge("hafence_leader_term", "The role's lease term held by this replica (0: not leader)", ["role"],
             registry=None)

COMMON: tuple[Collector, ...] = (DEAD_LETTERS, LEADER, TERM)
# What each service serves. A service not listed (a tool, a test) serves everything.
OWN: dict[str, tuple[Collector, ...]] = {
    "heartbeat": (HEARTBEATS, HOSTS, MONITOR_LAG, MONITOR_OVERLOADED),
    "arbiter": (HOSTS, DECISIONS),
    "fencer": (FENCES, FENCE_SECONDS, PROTECTED),
    "scheduler": (PLACEMENTS, PENDING, FAILOVER_SECONDS, HA_RESERVATION, VM_EVENTS, VM_RESTARTS, VM_RESTART_LIMITS),
    "agent": (AGENT_HEARTBEATS, AGENT_VM_STARTS, AGENT_VM_FAILURES, AGENT_POWERED, STORAGE_LEASE),
}


def _all() -> tuple[Collector, ...]:
    return COMMON + tuple(dict.fromkeys(c for cs in OWN.values() for c in cs))


def decision_labels() -> list[tuple[str, str]]:
    """(decision, rule) pairs the arbiter can count: every skip rule, and a fence."""
    from hafence.arbiter.policy import RequestFence, Rule, SkipFence

    return [(RequestFence.__name__, "fence"), *((SkipFence.__name__, rule) for rule in get_args(Rule))]


def prime(service: str, config: ClusterConfig | None, host: str = "") -> None:
    """Create the service's counter and histogram series at 0 for every label value
    they can take. Gauges are left alone: a gauge at 0 is a claim ("unprotected")."""
    hosts = [h.name for h in config.hosts] if config is not None else []
    DEAD_LETTERS.labels(service)
    if service == "heartbeat":
        for name in hosts:
            HEARTBEATS.labels(name)
    elif service == "arbiter":
        for decision, rule in decision_labels():
            DECISIONS.labels(decision, rule)
    elif service == "fencer":
        for outcome in get_args(FenceOutcome):
            FENCE_SECONDS.labels(outcome)
            for name in hosts:
                FENCES.labels(name, outcome)
    elif service == "scheduler":
        for result in get_args(StartResult):
            PLACEMENTS.labels(result)
        for kind in get_args(VmEventKind):
            VM_EVENTS.labels(kind)
        for reason in get_args(VmFailure):
            for where in get_args(RestartWhere):
                for result in get_args(RestartResult):
                    VM_RESTARTS.labels(reason, where, result)
        HA_RESERVATION.set(math.nan)  # no verdict yet: neither "ok" nor "lost"
    elif service == "agent" and host:
        AGENT_HEARTBEATS.labels(host)
        for result in get_args(AgentStartResult):
            AGENT_VM_STARTS.labels(host, result)
        for reason in get_args(VmFailure):
            AGENT_VM_FAILURES.labels(host, reason)


def registry_for(service: str) -> CollectorRegistry:
    """A registry with the service's own metrics, the common ones and the process's."""
    registry = CollectorRegistry(auto_describe=True)
    collectors: Iterable[Collector] = COMMON + OWN[service] if service in OWN else _all()
    for collector in collectors:
        registry.register(collector)
    _process.ProcessCollector(registry=registry)
    _platform.PlatformCollector(registry=registry)
    _gc.GCCollector(registry=registry)
    return registry


def serve(port: int, address: str = "0.0.0.0", service: str = "", config: ClusterConfig | None = None,
          host: str = "") -> bool:
    """Prime the service's series, then start its /metrics endpoint (a daemon thread
    of prometheus_client). A port that cannot be bound is an error in the log, not a
    stopped service: fencing and failover matter more than their metrics."""
    prime(service, config, host)
    if not port:
        return False
    try:
        start_http_server(port, addr=address, registry=registry_for(service))
    except OSError as err:
        logging.getLogger("hafence.metrics").error(
            "metrics endpoint not served: cannot listen on %s:%d (%s); the service runs without /metrics "
            "(set [metrics] port or HAFENCE_METRICS_PORT)", address, port, err.strerror or err)
        return False
    return True
