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


async def test_terms_never_go_back_when_the_bucket_is_recreated(nc: NatsClient) -> None:
    """Before: the term was the revision of the create, and a recreated bucket
    starts its revisions at 1 again: the next leader's term was below the last
    one, and the fencer refused it for good."""
    kv = await bucket(nc, ttl=5.0)
    for i in range(5):
        await kv.put(f"noise{i}", b"x")  # revisions move on, as renewals would
    a = LeaderLease(kv, "arbiter", "a", ttl=5.0)
    b = LeaderLease(kv, "arbiter", "b", ttl=5.0)
    await a.step()
    await b.step()  # standing by, b reads a's term from the bucket
    assert a.held() and not b.held() and b.floor == a.term
    old = a.term
    assert old > 5
    await nc.jetstream().delete_key_value("HAFENCE_leases")
    kv = await bucket(nc, ttl=5.0)
    b.kv = kv
    await b.step()
    assert b.held() and b.term > old


async def test_a_holder_told_of_a_higher_term_raises_its_own(nc: NatsClient) -> None:
    kv = await bucket(nc, ttl=5.0)
    a = LeaderLease(kv, "arbiter", "a", ttl=5.0)
    b = LeaderLease(kv, "arbiter", "b", ttl=5.0)
    await a.step()
    before = a.term
    a.learn(before + 1000)  # a fencer refused us: it admitted a term 1000 above ours
    assert a.needs_raise()
    assert await a.raise_term()
    assert a.held() and a.term > before + 1000 and not a.needs_raise()
    await b.step()
    assert b.floor == a.term  # the raised term is in the bucket for standbys
    b.learn(10**30)  # corrupt or hostile: ignored
    b.learn(-5)
    assert b.floor == a.term
    assert not await b.raise_term()  # only the holder can
