"""Leader leases on a real JetStream KV bucket."""

import asyncio

from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig

from hafence.lease import LeaderLease


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def bucket(nc: NatsClient, ttl: float = 1.0):  # type: ignore[no-untyped-def]
    return await nc.jetstream().create_key_value(KeyValueConfig(bucket="HAFENCE_leases", ttl=ttl, history=1))


async def test_one_holder_at_a_time_and_terms_only_grow(nc: NatsClient) -> None:
    kv = await bucket(nc)
    a = LeaderLease(kv, "arbiter", "a", ttl=1.0)
    b = LeaderLease(kv, "arbiter", "b", ttl=1.0)
    await a.step()
    await b.step()
    assert a.held() and not b.held()
    first = a.term
    await a.release()
    await b.step()
    assert b.held() and b.term > first
    # a comes back: it cannot take the lease while b renews it.
    await a.step()
    await b.step()
    assert not a.held() and b.held()


async def test_a_paused_leader_stops_acting_and_loses_to_a_new_term(nc: NatsClient) -> None:
    kv = await bucket(nc, ttl=1.0)
    clock = FakeClock()
    old = LeaderLease(kv, "arbiter", "old", ttl=1.0, clock=clock)
    await old.step()
    assert old.held()
    old_term = old.term
    clock.now += 5.0  # the process was frozen past its lease
    assert not old.held()  # it knows before it even asks the server
    await asyncio.sleep(1.3)  # the server expires the key
    new = LeaderLease(kv, "arbiter", "new", ttl=1.0)
    await new.step()
    assert new.held() and new.term > old_term
    await old.step()  # resumed: its compare-and-set fails; it is not leader
    assert not old.held() and old.term == 0
