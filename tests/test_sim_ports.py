"""The simulated transport against a real nats-server: the same script, the same observations;
and one Delivery protocol that nats-py's messages and the simulated ones both satisfy."""

from __future__ import annotations

import random

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, RetentionPolicy, StreamConfig

from hafence.sim import streams
from hafence.sim.clock import Scheduler
from hafence.sim.ports import Delivery, Message
from hafence.sim.transport import EventLog, SimNats


def describe(d: Delivery) -> tuple[str, bytes, int, int, int, str, str]:
    """What a handler reads from a delivery, typed against the Protocol only."""
    m = d.metadata
    return (d.subject, d.data, m.sequence.stream, m.num_delivered, m.num_pending, m.stream, m.consumer)


async def real_script(nc: NatsClient) -> list[object]:
    js = nc.jetstream()
    seen: list[object] = []
    await js.add_stream(
        StreamConfig(name="REQ", subjects=["req.*"], retention=RetentionPolicy.WORK_QUEUE, duplicate_window=600.0)
    )
    await js.add_consumer("REQ", ConsumerConfig(durable_name="fencer", ack_policy=AckPolicy.EXPLICIT, ack_wait=30.0))
    for subject, msg_id in [("req.h1", "i1"), ("req.h1", "i1"), ("req.h2", "i2")]:
        ack = await js.publish(subject, b"fence", headers={"Nats-Msg-Id": msg_id})
        seen.append(("pub", ack.seq, bool(ack.duplicate)))
    sub = await js.pull_subscribe_bind(durable="fencer", stream="REQ")
    [msg] = await sub.fetch(1, timeout=5.0)
    assert isinstance(msg, Delivery) and isinstance(msg, Message)
    seen.append(describe(msg))
    await msg.ack_sync()
    ack = await js.publish("req.h1", b"fence", headers={"Nats-Msg-Id": "i1"})  # acked, still remembered
    seen.append(("pub after ack", ack.seq, bool(ack.duplicate)))

    kv = await js.create_key_value(KeyValueConfig(bucket="leases", ttl=60.0, history=1))
    r1 = await kv.create("arbiter", b"a")
    seen.append(("create", r1))
    seen.append(("update", await kv.update("arbiter", b"b", last=r1)))
    for attempt in ("create", "stale update"):
        try:
            if attempt == "create":
                await kv.create("arbiter", b"c")
            else:
                await kv.update("arbiter", b"c", last=r1)
        except nats.js.errors.KeyWrongLastSequenceError:
            seen.append((attempt, "wrong last sequence"))
    await kv.delete("arbiter")
    try:
        await kv.get("arbiter")
    except nats.js.errors.KeyNotFoundError:
        seen.append(("get deleted", "not found"))
    seen.append(("create after delete", await kv.create("arbiter", b"d")))
    await js.delete_key_value("leases")
    kv = await js.create_key_value(KeyValueConfig(bucket="leases", ttl=60.0, history=1))
    seen.append(("create in new bucket", await kv.create("arbiter", b"e")))
    return seen


def sim_script() -> list[object]:
    s = Scheduler()
    net = SimNats(s, random.Random(1), log=EventLog(s))
    c = net.connect("client")
    seen: list[object] = []
    net.add_stream(streams.StreamConfig("REQ", ("req.*",), retention="workqueue", duplicate_window=600.0))
    net.add_consumer("REQ", streams.ConsumerConfig("fencer", ack_wait=30.0))
    for subject, msg_id in [("req.h1", "i1"), ("req.h1", "i1"), ("req.h2", "i2")]:
        ack = s.run_until_complete(c.js_publish(subject, b"fence", msg_id=msg_id))
        seen.append(("pub", ack.seq, ack.duplicate))
    [msg] = s.run_until_complete(c.pull_subscribe("REQ", "fencer").fetch(1))
    assert isinstance(msg, Delivery) and isinstance(msg, Message)
    seen.append(describe(msg))
    s.run_until_complete(s.spawn(msg.ack()))
    s.run(until=s.now + 0.1)
    ack = s.run_until_complete(c.js_publish("req.h1", b"fence", msg_id="i1"))
    seen.append(("pub after ack", ack.seq, ack.duplicate))

    net.create_bucket("leases", ttl=60.0)
    kv = c.key_value("leases")
    r1 = s.run_until_complete(kv.create("arbiter", b"a"))
    seen.append(("create", r1))
    seen.append(("update", s.run_until_complete(kv.update("arbiter", b"b", last=r1))))
    for attempt, op in (("create", lambda: kv.create("arbiter", b"c")),
                        ("stale update", lambda: kv.update("arbiter", b"c", last=r1))):
        try:
            s.run_until_complete(op())
        except streams.WrongLastSequence:
            seen.append((attempt, "wrong last sequence"))
    s.run_until_complete(kv.delete("arbiter"))
    try:
        s.run_until_complete(kv.get("arbiter"))
    except streams.KeyNotFound:
        seen.append(("get deleted", "not found"))
    seen.append(("create after delete", s.run_until_complete(kv.create("arbiter", b"d"))))
    net.delete_bucket("leases")
    net.create_bucket("leases", ttl=60.0)
    seen.append(("create in new bucket", s.run_until_complete(kv.create("arbiter", b"e"))))
    return seen


async def test_the_simulation_observes_what_a_real_nats_server_does(nc: NatsClient) -> None:
    real = await real_script(nc)
    assert sim_script() == real
    # The script did exercise what it claims to (not two empty lists agreeing):
    assert real[:3] == [("pub", 1, False), ("pub", 1, True), ("pub", 2, False)]
    assert real[3] == ("req.h1", b"fence", 1, 1, 1, "REQ", "fencer")
    assert real[4] == ("pub after ack", 1, True)
    assert real[-1] == ("create in new bucket", 1)
