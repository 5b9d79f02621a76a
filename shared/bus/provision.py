"""Streams, the lease bucket and durable consumers, created or updated idempotently."""

from __future__ import annotations

import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from hafence.bus.base import BusBase


class Provisioning(BusBase):
    def event_subjects(self) -> list[str]:
        """Every subject of the events stream."""
        p = self.subjects.prefix
        return [f"{p}.host.>", f"{p}.vm.>", f"{p}.fence.result.>", f"{p}.inventory.*", f"{p}.alert.*"]

    async def provision(self) -> None:
        """Create or update the streams and the lease bucket; safe to run from every service."""
        s, n = self.subjects, self.streams
        replicas = self.config.nats.stream_replicas
        day = 24 * 3600.0
        wanted = [
            StreamConfig(
                name=n.events,
                # One stream, so that a service replaying it sees inventories,
                # host events and fence results in the order they happened.
                subjects=self.event_subjects(),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * day,
                # Replays need the recent past of each host and VM, not all of it.
                max_msgs_per_subject=64,
                duplicate_window=600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=n.fence_requests,
                subjects=[f"{s.prefix}.fence.request.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=3600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=n.dlq,
                subjects=[f"{s.prefix}.dlq.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * day,
                num_replicas=replicas,
            ),
        ]
        for config in wanted:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(config)
        try:
            await self.js.key_value(n.leases)
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_key_value(
                KeyValueConfig(
                    bucket=n.leases, ttl=self.config.timings.lease_ttl_s, history=1, replicas=replicas
                )
            )

    async def ensure_consumer(
        self, stream: str, durable: str, filters: list[str], ack_wait: float = 30.0
    ) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            filter_subjects=filters,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_ack_pending=1000,
        )
        await self.js.add_consumer(stream, config)
