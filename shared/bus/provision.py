"""Streams, the lease bucket, the fencer replicas' buckets and the fencer's durable consumer.

Only the provisioner (``hafence deploy provision``, its own NATS identity)
creates or updates them. A service checks at start that what it needs exists
and, until it does, says what is missing and that the provisioner must run: the
services' NATS identities have no right to create, change or delete any of it.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import nats.js.errors
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from hafence.bus.base import BusBase
from hafence.bus.names import StreamNames

log = logging.getLogger("hafence.bus")

DAY = 24 * 3600.0
FENCER_DURABLE = "fencer"
# Dead letters: at most this many kept per dead-letter subject (the newest), each
# at most NATS's default max_payload; the byte limit is what every publisher's
# subject can hold, so one flooding publisher (an agent) pushes out only its own
# letters, never another service's.
DLQ_PER_SUBJECT = 256
DLQ_MAX_MSG = 1024 * 1024
DLQ_PUBLISHERS = ("heartbeat", "arbiter", "fencer", "scheduler", "agent")



def fencer_locks_bucket(names: StreamNames) -> str:
    """Device locks and request claims shared by fencer replicas (TTL: ``[fencer] lock_ttl_s``)."""
    return names.leases.removesuffix("leases") + "fencer_locks"


def fencer_state_bucket(names: StreamNames) -> str:
    """The fencer replicas' highest term and request records (no TTL: a term never goes back)."""
    return names.leases.removesuffix("leases") + "fencer"


PROVISION_HINT = "run `hafence deploy provision --config FILE` (the provisioner identity creates them)"

# What each service needs before it starts; "consumer:fencer" is the fencer's durable.
NEEDS: dict[str, tuple[str, ...]] = {
    "heartbeat": ("events", "dlq", "leases"),
    "arbiter": ("events", "fence_requests", "dlq", "leases"),
    "fencer": ("events", "fence_requests", "dlq", "consumer:fencer", "fencer_locks", "fencer_state"),
    "scheduler": ("events", "dlq", "leases"),
    "cli": ("events",),
}


class Provisioning(BusBase):
    def event_subjects(self) -> list[str]:
        """Every subject of the events stream."""
        p = self.subjects.prefix
        return [f"{p}.host.>", f"{p}.vm.>", f"{p}.fence.result.>", f"{p}.inventory.*", f"{p}.alert.*"]

    def wanted_streams(self, replicas: int) -> list[StreamConfig]:
        s, n = self.subjects, self.streams
        return [
            StreamConfig(
                name=n.events,
                # One stream, so that a service replaying it sees inventories,
                # host events and fence results in the order they happened.
                subjects=self.event_subjects(),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * DAY,
                # Replays need the recent past of each host and VM, not all of it.
                max_msgs_per_subject=64,
                duplicate_window=600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=n.fence_requests,
                subjects=[s.fence_requests()],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=3600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=n.dlq,
                subjects=[s.dlq_all()],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * DAY,
                max_msgs_per_subject=DLQ_PER_SUBJECT,
                max_msg_size=DLQ_MAX_MSG,
                max_bytes=DLQ_PER_SUBJECT * DLQ_MAX_MSG * len(DLQ_PUBLISHERS),
                discard=DiscardPolicy.OLD,
                num_replicas=replicas,
            ),
        ]

    def fencer_consumer(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=FENCER_DURABLE,
            filter_subjects=[self.subjects.fence_requests()],
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.timings.fence_ack_wait_s,
            max_ack_pending=1000,
        )

    async def provision(self, replicas: int | None = None) -> list[str]:
        """Create or update the streams, the lease bucket and the fencer's durable
        consumer (idempotent); one line per object, for the operator."""
        n = self.streams
        replicas = replicas or self.config.nats.stream_replicas
        done = []
        for config in self.wanted_streams(replicas):
            try:
                await self.js.add_stream(config)
                done.append(f"stream {config.name}: ok")
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(config)
                done.append(f"stream {config.name}: updated")
        try:
            await self.js.key_value(n.leases)
            done.append(f"bucket {n.leases}: ok")
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_key_value(
                KeyValueConfig(bucket=n.leases, ttl=self.config.timings.lease_ttl_s, history=1, replicas=replicas)
            )
            done.append(f"bucket {n.leases}: created")
        done += await self._provision_fencer_buckets(replicas)
        await self.js.add_consumer(n.fence_requests, self.fencer_consumer())
        done.append(f"consumer {n.fence_requests}/{FENCER_DURABLE}: ok")
        return [f"{line} (replicas {replicas})" for line in done]

    async def _provision_fencer_buckets(self, replicas: int) -> list[str]:
        """The replicas' shared buckets (docs/fencer-replicas.md); a changed lock TTL
        is applied to the existing bucket."""
        done = []
        ttl = self.config.fencer.lock_ttl_s
        for bucket, bucket_ttl in ((fencer_locks_bucket(self.streams), ttl), (fencer_state_bucket(self.streams), None)):
            try:
                info = await self.js.stream_info(f"KV_{bucket}")
            except nats.js.errors.NotFoundError:
                await self.js.create_key_value(KeyValueConfig(bucket=bucket, ttl=bucket_ttl, history=1,
                                                              replicas=replicas))
                done.append(f"bucket {bucket}: created")
                continue
            if bucket_ttl is not None and info.config.max_age != bucket_ttl:
                info.config.max_age = bucket_ttl
                await self.js.update_stream(info.config)
                done.append(f"bucket {bucket}: ttl set to {bucket_ttl:g}s")
            else:
                done.append(f"bucket {bucket}: ok")
        return done

    async def missing(self, service: str) -> list[str]:
        """What ``service`` needs that does not exist (or cannot be read), each named."""
        n = self.streams
        out = []
        for need in NEEDS.get(service, ("events", "dlq")):
            if need == "consumer:fencer":
                what = f"consumer {n.fence_requests}/{FENCER_DURABLE}"
                check = self.js.consumer_info(n.fence_requests, FENCER_DURABLE)
            elif need in ("fencer_locks", "fencer_state"):
                bucket = fencer_locks_bucket(n) if need == "fencer_locks" else fencer_state_bucket(n)
                what, check = f"bucket {bucket}", self.js.stream_info(f"KV_{bucket}")
            else:
                name = f"KV_{n.leases}" if need == "leases" else getattr(n, need)
                what = f"bucket {n.leases}" if need == "leases" else f"stream {name}"
                check = self.js.stream_info(name)
            try:
                await check
            except nats.js.errors.NotFoundError:
                out.append(f"{what} is missing")
            except (nats.errors.TimeoutError, TimeoutError, nats.errors.NoRespondersError) as err:
                out.append(f"{what} cannot be read ({type(err).__name__}: JetStream down, or no right to look)")
        return out

    async def wait_provisioned(self, service: str, stop: asyncio.Event) -> bool:
        """Wait until everything ``service`` needs exists; False if stopped first."""
        delay = 0.2
        while not stop.is_set():
            missing = await self.missing(service)
            if not missing:
                return True
            log.error("%s cannot start: %s; %s", service, "; ".join(missing), PROVISION_HINT)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
        return False

    async def ensure_consumer(
        self, stream: str, durable: str, filters: list[str], ack_wait: float = 30.0
    ) -> None:
        """Check that the provisioned durable consumer exists and is what this
        service expects; a service may not create or change it."""
        try:
            info = await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            raise RuntimeError(f"consumer {stream}/{durable} is missing: {PROVISION_HINT}") from None
        got_filters = info.config.filter_subjects or ([info.config.filter_subject]
                                                      if info.config.filter_subject else [])
        if sorted(got_filters) != sorted(filters) or info.config.ack_wait != ack_wait:
            log.warning(
                "consumer %s/%s has filters %s and ack_wait %ss, the config wants %s and %ss: %s again",
                stream, durable, got_filters, info.config.ack_wait, filters, ack_wait, PROVISION_HINT,
            )
