"""``hafence deploy provision`` in the simulation: the same streams, consumer and buckets.

The wanted objects come from production's ``Provisioning`` (``wanted_streams``,
``fencer_consumer``, the bucket names and TTLs), so a change there reaches the
simulation; only their translation into ``SimNats`` administration is here.
"""

from __future__ import annotations

from typing import Any

from nats.js.api import RetentionPolicy

from hafence.bus.names import StreamNames
from hafence.bus.provision import Provisioning, fencer_locks_bucket, fencer_state_bucket
from hafence.config import ClusterConfig
from hafence.sim.streams import ConsumerConfig, StreamConfig
from hafence.sim.transport import SimNats


class _NoConnection:
    """Provisioning's constructor asks its connection for a JetStream context; nothing is sent."""

    def jetstream(self) -> None:
        return None


def provision(net: SimNats, config: ClusterConfig) -> StreamNames:
    """Create what the provisioner creates; the names of the streams and the lease bucket."""
    wanted = Provisioning(_NoConnection(), config, "provisioner")  # type: ignore[arg-type]
    for stream in wanted.wanted_streams(1):
        net.add_stream(_stream(stream))
    names = wanted.streams
    consumer = wanted.fencer_consumer()
    net.add_consumer(names.fence_requests, ConsumerConfig(
        durable=consumer.durable_name or "",
        filter_subjects=tuple(consumer.filter_subjects or ()),
        ack_wait=float(consumer.ack_wait or 30.0),
        max_deliver=consumer.max_deliver or -1,
        max_ack_pending=consumer.max_ack_pending or 1000,
    ))
    net.create_bucket(names.leases, ttl=config.timings.lease_ttl_s)
    net.create_bucket(fencer_locks_bucket(names), ttl=config.fencer.lock_ttl_s)
    net.create_bucket(fencer_state_bucket(names))
    return names


def _stream(config: Any) -> StreamConfig:
    return StreamConfig(
        name=config.name,
        subjects=tuple(config.subjects),
        retention="workqueue" if config.retention == RetentionPolicy.WORK_QUEUE else "limits",
        max_msgs_per_subject=config.max_msgs_per_subject if config.max_msgs_per_subject is not None else -1,
        max_age=float(config.max_age or 0.0),
        duplicate_window=float(config.duplicate_window or 120.0),
    )
