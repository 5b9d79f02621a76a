"""The simulated NATS: the JetStream and core semantics hafence relies on, its faults, its determinism."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from hafence.sim.clock import NodeClock, Scheduler, SimFuture
from hafence.sim.streams import (
    ConsumerConfig,
    JetStreamError,
    KeyNotFound,
    NoStream,
    StreamConfig,
    StreamNotFound,
    WrongLastSequence,
)
from hafence.sim.subjects import subject_matches
from hafence.sim.transport import (
    AlreadyAcked,
    CoreMsg,
    EventLog,
    Faults,
    NoResponders,
    SimDelivery,
    SimNats,
)

T = Any


def make(seed: int = 1, faults: Faults | None = None) -> tuple[Scheduler, SimNats]:
    s = Scheduler()
    return s, SimNats(s, random.Random(seed), faults, log=EventLog(s))


def wait(s: Scheduler, fut: SimFuture[T]) -> T:
    return s.run_until_complete(fut)


def work_queue(net: SimNats, ack_wait: float = 5.0, max_deliver: int = -1, window: float = 60.0) -> None:
    net.add_stream(StreamConfig("REQ", ("req.*",), retention="workqueue", duplicate_window=window))
    net.add_consumer("REQ", ConsumerConfig("fencer", ack_wait=ack_wait, max_deliver=max_deliver))


def fetch_one(s: Scheduler, net: SimNats, conn_name: str = "f", timeout: float = 30.0) -> SimDelivery:
    conn = next(c for c in net.connections if c.node == conn_name)
    [d] = wait(s, conn.pull_subscribe("REQ", "fencer").fetch(1, timeout=timeout))
    return d


def ack(s: Scheduler, d: SimDelivery, kind: str = "ack", *args: float) -> None:
    """Acknowledge, and let the acknowledgement reach the server (it is fire-and-forget)."""
    wait(s, s.spawn(getattr(d, kind)(*args)))
    s.run(until=s.now + 0.01)


# -- subjects ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("*.b.>", "x.b.y", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_wildcards(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


# -- core NATS ---------------------------------------------------------------------------


def test_a_queue_group_gets_each_message_once_plain_subscribers_all() -> None:
    s, net = make()
    got: dict[str, list[str]] = {"q1": [], "q2": [], "plain": []}
    for name in got:
        conn = net.connect(name)
        conn.subscribe("hb.*", lambda m, n=name: got[n].append(m.subject), queue="" if name == "plain" else "hb")
    s.run(until=0.1)
    pub = net.connect("pub")
    for i in range(40):
        pub.publish(f"hb.h{i}", b"x")
    s.run(until=1.0)
    assert len(got["plain"]) == 40
    assert len(got["q1"]) + len(got["q2"]) == 40
    assert got["q1"] and got["q2"]  # the member is drawn per message


def test_one_publisher_reaches_a_subscriber_in_order_despite_delay_spikes() -> None:
    s, net = make(faults=Faults(spike_probability=0.5, spike_max=0.3))
    got: list[bytes] = []
    net.connect("sub").subscribe("x", lambda m: got.append(m.data))
    s.run(until=0.1)
    a, b = net.connect("a"), net.connect("b")
    for i in range(50):
        a.publish("x", f"a{i:02}".encode())
        b.publish("x", f"b{i:02}".encode())
    s.run(until=10.0)
    from_a = [m for m in got if m.startswith(b"a")]
    assert from_a == sorted(from_a) and len(from_a) == 50
    assert got != sorted(got, key=lambda m: (int(m[1:]), m[:1]))  # the two publishers did interleave freely


def test_request_reply_no_responders_and_timeout() -> None:
    s, net = make()
    server = net.connect("agent")

    async def answer(m: CoreMsg) -> None:
        await m.respond(b"pong " + m.data)

    server.subscribe("cmd.h1", answer)
    client = net.connect("sched")
    s.run(until=0.1)
    assert wait(s, client.request("cmd.h1", b"ping")).data == b"pong ping"
    with pytest.raises(NoResponders):
        wait(s, client.request("cmd.h2", b"ping"))
    net.cut("agent")  # subscribed, but unreachable: the request times out instead
    started = s.now
    with pytest.raises(TimeoutError):
        wait(s, client.request("cmd.h1", b"ping", timeout=2.0))
    assert s.now - started == pytest.approx(2.0)


def test_core_messages_may_be_lost_never_duplicated() -> None:
    s, net = make(seed=3, faults=Faults(core_loss=0.3))
    got: list[bytes] = []
    net.connect("sub").subscribe("x", lambda m: got.append(m.data))
    s.run(until=0.1)
    pub = net.connect("pub")
    for i in range(200):
        pub.publish("x", str(i).encode())
    s.run(until=5.0)
    assert 100 < len(got) < 200
    assert len(set(got)) == len(got)


# -- streams -----------------------------------------------------------------------------


def test_limits_keep_the_newest_per_subject_and_expire_by_age() -> None:
    s, net = make()
    net.add_stream(StreamConfig("EV", ("ev.>",), max_msgs_per_subject=2, max_age=100.0))
    c = net.connect("p")
    for i in range(3):
        wait(s, c.js_publish("ev.h1", str(i).encode()))
    wait(s, c.js_publish("ev.h2", b"x"))
    stream = net.streams["EV"]
    assert [(m.subject, m.data) for m in stream.msgs.values()] == [("ev.h1", b"1"), ("ev.h1", b"2"), ("ev.h2", b"x")]
    s.run(until=150.0)
    wait(s, c.js_publish("ev.h3", b"new"))
    assert [m.data for m in stream.msgs.values()] == [b"new"]
    assert stream.last_seq == 5  # sequences only grow


def test_publish_without_a_stream_and_overlapping_streams_are_errors() -> None:
    s, net = make()
    net.add_stream(StreamConfig("EV", ("ev.>",)))
    with pytest.raises(JetStreamError, match="overlap"):
        net.add_stream(StreamConfig("OTHER", ("ev.*.x",)))
    with pytest.raises(NoStream):
        wait(s, net.connect("p").js_publish("nothing.here", b""))


def test_msg_id_deduplicates_within_the_window_even_after_the_ack() -> None:
    s, net = make()
    work_queue(net, window=60.0)
    p = net.connect("p")
    net.connect("f")
    first = wait(s, p.js_publish("req.h1", b"fence", msg_id="incident-1"))
    ack(s, fetch_one(s, net))
    assert net.streams["REQ"].msgs == {}
    again = wait(s, p.js_publish("req.h1", b"fence", msg_id="incident-1"))
    assert again.duplicate and again.seq == first.seq  # acked and gone, still remembered
    s.run(until=s.now + 61.0)
    late = wait(s, p.js_publish("req.h1", b"fence", msg_id="incident-1"))
    assert not late.duplicate and late.seq == first.seq + 1


def test_a_nats_restart_forgets_the_ids_of_acked_work_queue_messages() -> None:
    # Checked against nats-server 2.10: the de-duplication memory is rebuilt from stored messages.
    s, net = make()
    work_queue(net, window=3600.0)
    p = net.connect("p")
    net.connect("f")
    wait(s, p.js_publish("req.h1", b"a", msg_id="acked"))
    wait(s, p.js_publish("req.h2", b"b", msg_id="kept"))
    ack(s, fetch_one(s, net))
    net.restart(down_for=1.0)
    s.run(until=s.now + 3.0)
    assert not wait(s, p.js_publish("req.h1", b"a", msg_id="acked")).duplicate
    assert wait(s, p.js_publish("req.h2", b"b", msg_id="kept")).duplicate


def test_a_lost_publish_reply_and_a_retry_store_once_with_a_msg_id_twice_without() -> None:
    s, net = make(faults=Faults(reply_loss=1.0))
    work_queue(net)
    p = net.connect("p")
    for msg_id in ("id-1", "id-1", "", ""):
        with pytest.raises(TimeoutError):
            wait(s, p.js_publish("req.h1", msg_id.encode(), msg_id=msg_id, timeout=1.0))
    assert [m.data for m in net.streams["REQ"].msgs.values()] == [b"id-1", b"", b""]


# -- the work queue ------------------------------------------------------------------------


def test_work_queue_delivery_carries_its_metadata() -> None:
    s, net = make()
    work_queue(net)
    p = net.connect("p")
    net.connect("f")
    for h in ("h1", "h2", "h3"):
        wait(s, p.js_publish(f"req.{h}", h.encode()))
    d = fetch_one(s, net)
    assert (d.subject, d.data) == ("req.h1", b"h1")
    m = d.metadata
    assert (m.stream, m.consumer, m.sequence.stream, m.sequence.consumer) == ("REQ", "fencer", 1, 1)
    assert (m.num_delivered, m.num_pending) == (1, 2)
    assert m.timestamp.timestamp() == pytest.approx(net.clock.wall(), abs=0.1)


def test_unacked_message_is_redelivered_after_the_ack_wait() -> None:
    s, net = make()
    work_queue(net, ack_wait=5.0)
    net.connect("f")
    wait(s, net.connect("p").js_publish("req.h1", b"x"))
    first = fetch_one(s, net)
    delivered_at = s.now
    again = fetch_one(s, net)
    assert again.metadata.sequence.stream == first.metadata.sequence.stream
    assert again.metadata.num_delivered == 2
    assert again.metadata.sequence.consumer == 2
    assert s.now - delivered_at == pytest.approx(5.0, abs=0.01)


def test_in_progress_resets_the_ack_wait() -> None:
    s, net = make()
    work_queue(net, ack_wait=5.0)
    net.connect("f")
    wait(s, net.connect("p").js_publish("req.h1", b"x"))
    d = fetch_one(s, net)
    start = s.now
    for _ in range(4):  # a slow BMC: 4 x 4 s, each within the ack wait of the last
        s.run(until=s.now + 4.0)
        ack(s, d, "in_progress")
    again = fetch_one(s, net)
    assert again.metadata.num_delivered == 2
    assert s.now - start == pytest.approx(16.0 + 5.0, abs=0.05)


def test_nak_with_delay_redelivers_after_the_delay_not_before() -> None:
    s, net = make()
    work_queue(net, ack_wait=30.0)
    net.connect("f")
    wait(s, net.connect("p").js_publish("req.h1", b"x"))
    d = fetch_one(s, net)
    start = s.now
    ack(s, d, "nak", 3.0)
    again = fetch_one(s, net)
    assert again.metadata.num_delivered == 2
    assert s.now - start == pytest.approx(3.0, abs=0.01)


def test_max_deliver_stops_redelivery_and_keeps_the_message() -> None:
    s, net = make()
    work_queue(net, ack_wait=1.0, max_deliver=3)
    net.connect("f")
    wait(s, net.connect("p").js_publish("req.h1", b"x"))
    counts = []
    for _ in range(3):
        d = fetch_one(s, net)
        counts.append(d.metadata.num_delivered)
        ack(s, d, "nak")
    assert counts == [1, 2, 3]
    with pytest.raises(TimeoutError):
        fetch_one(s, net, timeout=10.0)
    assert list(net.streams["REQ"].msgs) == [1]


def test_term_and_ack_remove_from_the_work_queue_and_an_ack_twice_is_refused() -> None:
    s, net = make()
    work_queue(net)
    net.connect("f")
    p = net.connect("p")
    wait(s, p.js_publish("req.h1", b"a"))
    wait(s, p.js_publish("req.h2", b"b"))
    a = fetch_one(s, net)
    ack(s, a, "term")
    with pytest.raises(AlreadyAcked):
        ack(s, a)
    ack(s, fetch_one(s, net))
    assert net.streams["REQ"].msgs == {}


def test_an_ack_from_an_expired_delivery_still_acks_the_message() -> None:
    # Checked against nats-server 2.10: acks apply to the stream sequence.
    s, net = make()
    work_queue(net, ack_wait=2.0)
    net.connect("f")
    wait(s, net.connect("p").js_publish("req.h1", b"x"))
    stale = fetch_one(s, net)
    fetch_one(s, net)  # the redelivery, still running
    ack(s, stale)
    assert net.streams["REQ"].msgs == {}


def test_a_delivery_after_the_fetch_timed_out_comes_with_the_next_fetch() -> None:
    s, net = make(faults=Faults(latency_min=0.5, latency_max=0.5))
    work_queue(net)
    f = net.connect("f")
    pull = f.pull_subscribe("REQ", "fencer")
    s.run(until=1.0)
    first = pull.fetch(1, timeout=1.5)  # the pull arrives at 1.5, the message at 2.0 and 2.5 here
    s.call_at(1.6, lambda: net.connect("p").js_publish("req.h1", b"x"))
    with pytest.raises(TimeoutError):
        wait(s, first)
    s.run(until=5.0)
    [late] = wait(s, pull.fetch(1, timeout=1.0))
    assert late.data == b"x" and late.metadata.num_delivered == 1


def test_a_lost_ack_means_a_redelivery() -> None:
    s, net = make(faults=Faults(ack_loss=1.0))
    work_queue(net, ack_wait=3.0)
    net.connect("f")
    wait(s, net.connect("p").js_publish("req.h1", b"x"))
    ack(s, fetch_one(s, net))
    assert fetch_one(s, net).metadata.num_delivered == 2


# -- KV -------------------------------------------------------------------------------------


def test_kv_create_update_compare_and_set_delete_and_recreate() -> None:
    s, net = make()
    net.create_bucket("leases", ttl=10.0)
    kv = net.connect("arbiter").key_value("leases")
    r1 = wait(s, kv.create("arbiter", b"a"))
    r2 = wait(s, kv.update("arbiter", b"b", last=r1))
    assert (r1, r2) == (1, 2)
    with pytest.raises(WrongLastSequence):
        wait(s, kv.create("arbiter", b"other"))
    with pytest.raises(WrongLastSequence):
        wait(s, kv.update("arbiter", b"stale", last=r1))
    wait(s, kv.put("fencer", b"f"))  # revisions are shared by all keys
    assert wait(s, kv.get("arbiter")).revision == 2
    wait(s, kv.delete("arbiter"))
    with pytest.raises(KeyNotFound):
        wait(s, kv.get("arbiter"))
    assert wait(s, kv.create("arbiter", b"c")) == 5


def test_kv_ttl_expires_a_key_that_is_not_renewed() -> None:
    s, net = make()
    net.create_bucket("leases", ttl=10.0)
    kv = net.connect("arbiter").key_value("leases")
    r = wait(s, kv.create("arbiter", b"a"))
    s.run(until=s.now + 8.0)
    r = wait(s, kv.update("arbiter", b"a", last=r))  # renewed: 10 s from now
    s.run(until=s.now + 8.0)
    assert wait(s, kv.get("arbiter")).revision == r
    s.run(until=s.now + 3.0)
    with pytest.raises(KeyNotFound):
        wait(s, kv.get("arbiter"))
    with pytest.raises(WrongLastSequence):
        wait(s, kv.update("arbiter", b"late", last=r))  # the old holder cannot renew
    assert wait(s, kv.create("arbiter", b"new holder")) == r + 1  # revisions go on growing


def test_bucket_loss_restarts_revisions_so_a_new_term_can_be_lower() -> None:
    # Why the term rules must not trust a revision alone: after the bucket is lost
    # and re-created, the next leader's term (its create revision) starts at 1 again.
    s, net = make()
    net.create_bucket("leases", ttl=10.0)
    kv = net.connect("arbiter").key_value("leases")
    for _ in range(5):
        wait(s, kv.put("noise", b""))
    old_term = wait(s, kv.create("arbiter", b"old"))
    net.delete_bucket("leases")
    with pytest.raises(StreamNotFound):
        wait(s, kv.get("arbiter"))
    net.create_bucket("leases", ttl=10.0)
    new_term = wait(s, kv.create("arbiter", b"new"))
    assert (old_term, new_term) == (6, 1)
    with pytest.raises(WrongLastSequence):
        wait(s, kv.update("arbiter", b"old", last=old_term))


# -- ordered replay --------------------------------------------------------------------------


def replay_setup(history: int) -> tuple[Scheduler, SimNats, list[int]]:
    s, net = make(faults=Faults(spike_probability=0.2, spike_max=0.5))
    net.add_stream(StreamConfig("EV", ("ev.>",)))
    p = net.connect("p")
    for i in range(history):
        wait(s, p.js_publish(f"ev.h{i % 3}", str(i).encode()))
    return s, net, []


def test_replay_of_an_empty_stream_is_caught_up_at_once() -> None:
    s, net, seen = replay_setup(0)
    r = net.connect("arb").replay("EV", ["ev.>"], lambda d: seen.append(d.metadata.sequence.stream))
    wait(s, r.caught_up)
    assert seen == []


def test_replay_is_caught_up_exactly_when_the_history_was_handed_over() -> None:
    s, net, seen = replay_setup(10)
    caught: list[int] = []
    r = net.connect("arb").replay("EV", ["ev.h1"], lambda d: seen.append(d.metadata.sequence.stream))
    r.caught_up.add_done_callback(lambda _: caught.append(len(seen)))
    wait(s, r.caught_up)
    s.run(until=s.now + 1.0)
    assert seen == [2, 5, 8] and caught == [3]


def test_replay_follows_new_messages_and_resumes_after_a_nats_restart_without_gaps_or_repeats() -> None:
    s, net, seen = replay_setup(5)
    r = net.connect("arb").replay("EV", ["ev.>"], lambda d: seen.append(d.metadata.sequence.stream))
    wait(s, r.caught_up)
    p = net.connect("p2")
    for i in range(30):
        s.call_at(s.now + i * 0.2, lambda i=i: p.js_publish(f"ev.x{i}", b""))
    s.call_at(s.now + 2.0, net.restart, 1.5)
    s.run(until=s.now + 20.0)
    stored = sorted(net.streams["EV"].msgs)
    assert seen == stored  # every stored message once, in order (publishes during the outage were lost)
    assert len(stored) < 35


# -- faults ---------------------------------------------------------------------------------


def test_a_cut_node_misses_core_messages_then_is_resubscribed_on_heal() -> None:
    s, net = make()
    got: list[bytes] = []
    net.connect("h1").subscribe("cmd.h1", lambda m: got.append(m.data))
    p = net.connect("p")
    s.run(until=0.1)
    net.cut("h1")
    p.publish("cmd.h1", b"during")
    s.run(until=1.0)
    net.heal("h1")
    s.run(until=2.0)
    p.publish("cmd.h1", b"after")
    s.run(until=3.0)
    assert got == [b"after"]


def test_what_is_in_flight_when_a_node_is_cut_off_is_lost_even_if_it_heals_before_arrival() -> None:
    s, net = make(faults=Faults(latency_min=0.5, latency_max=0.5, reconnect_delay=0.01))
    got: list[bytes] = []
    net.connect("h1").subscribe("x", lambda m: got.append(m.data))
    p = net.connect("p")
    s.run(until=1.0)
    p.publish("x", b"in flight")  # at the server at 1.5, at h1 at 2.0
    s.call_at(1.7, net.cut, "h1")
    s.call_at(1.8, net.heal, "h1")
    s.run(until=5.0)
    assert got == []


def test_a_nats_restart_keeps_streams_and_pending_messages_and_drops_what_was_in_flight() -> None:
    s, net = make()
    work_queue(net, ack_wait=5.0)
    got: list[bytes] = []
    net.connect("h1").subscribe("x", lambda m: got.append(m.data))
    net.connect("f")
    p = net.connect("p")
    wait(s, p.js_publish("req.h1", b"x"))
    d = fetch_one(s, net)
    net.restart(down_for=2.0)
    ack(s, d)  # lost: the server is down
    s.run(until=s.now + 3.0)
    p.publish("x", b"after restart")
    again = fetch_one(s, net)
    assert again.metadata.num_delivered == 2
    s.run(until=s.now + 1.0)
    assert got == [b"after restart"]


def test_a_node_with_a_drifting_clock_times_out_by_its_own_clock() -> None:
    s, net = make()
    slow = net.connect("h1", NodeClock(s, "h1", drift=-0.5))
    net.create_bucket("b")
    net.cut("h1")
    start = s.now
    with pytest.raises(TimeoutError):
        wait(s, slow.key_value("b").get("k", timeout=2.0))
    assert s.now - start == pytest.approx(4.0)


# -- determinism ------------------------------------------------------------------------------


def random_workload(seed: int, seconds: float = 60.0) -> str:
    """Everything at once, with every fault, driven by one seed."""
    rng = random.Random(seed)
    faults = Faults(spike_probability=0.05, spike_max=0.4, core_loss=0.05, ack_loss=0.05, reply_loss=0.05,
                    reconnect_delay=0.3)
    s = Scheduler()
    net = SimNats(s, rng, faults, log=EventLog(s))
    net.add_stream(StreamConfig("EV", ("ev.>",), max_msgs_per_subject=8, duplicate_window=30.0))
    work_queue(net, ack_wait=2.0, max_deliver=5, window=30.0)
    net.create_bucket("leases", ttl=3.0)
    nodes = [f"h{i}" for i in range(4)]
    conns = {n: net.connect(n, NodeClock(s, n, drift=rng.uniform(-0.01, 0.01))) for n in nodes}
    log = net.log

    async def responder(m: CoreMsg) -> None:
        await m.respond(b"ok")

    for n, c in conns.items():
        c.subscribe(f"cmd.{n}", responder)
        c.subscribe("hb.*", lambda m, n=n: None, queue="monitor")
        c.replay("EV", ["ev.>"], lambda d, n=n: log(n, f"fold #{d.metadata.sequence.stream} "
                                                      f"p={d.metadata.num_pending}"))

    async def fencer(c: Any) -> None:
        pull = c.pull_subscribe("REQ", "fencer")
        while True:
            try:
                batch = await pull.fetch(1, timeout=1.0)
            except TimeoutError:
                continue
            for d in batch:
                choice = rng.random()
                if choice < 0.6:
                    await d.ack()
                elif choice < 0.8:
                    await d.nak(rng.uniform(0, 1))
                elif choice < 0.9:
                    await d.in_progress()
                else:
                    await d.term()

    async def leader(c: Any) -> None:
        kv, revision = c.key_value("leases"), 0
        while True:
            try:
                if revision:
                    revision = await kv.update("arbiter", c.node.encode(), last=revision)
                else:
                    revision = await kv.create("arbiter", c.node.encode())
                log(c.name, f"lease rev={revision}")
            except (WrongLastSequence, StreamNotFound, TimeoutError) as err:
                log(c.name, f"lease lost: {type(err).__name__}")
                revision = 0
            await c.clock.sleep(0.75)

    async def chatter(c: Any) -> None:
        while True:
            await c.clock.sleep(rng.uniform(0.05, 0.5))
            what = rng.randrange(4)
            try:
                if what == 0:
                    c.publish(f"hb.{c.node}", b"beat")
                elif what == 1:
                    await c.request(f"cmd.{rng.choice(nodes)}", b"do", timeout=0.5)
                elif what == 2:
                    await c.js_publish(f"ev.{c.node}", str(rng.random()).encode(), msg_id=str(rng.randrange(20)))
                else:
                    await c.js_publish(f"req.{rng.choice(nodes)}", b"fence", msg_id=str(rng.randrange(20)))
            except (TimeoutError, NoResponders, JetStreamError) as err:
                log(c.name, f"chatter failed: {type(err).__name__}")

    s.spawn(fencer(conns["h0"]))
    for c in conns.values():
        s.spawn(leader(c))
        s.spawn(chatter(c))

    def fault() -> None:
        kind = rng.randrange(4)
        if kind == 0:
            n = rng.choice(nodes)
            net.cut(n)
            s.call_later(rng.uniform(0.5, 3.0), net.heal, n)
        elif kind == 1:
            net.restart(rng.uniform(0.2, 2.0))
        elif kind == 2:
            net.delete_bucket("leases")
            s.call_later(rng.uniform(0.1, 2.0), net.create_bucket, "leases", 3.0)
        else:
            conns[rng.choice(nodes)].clock.jump(rng.uniform(-5, 5))
        s.call_later(rng.uniform(1.0, 8.0), fault)

    s.call_later(2.0, fault)
    s.run(until=seconds)
    assert s.unhandled == [], s.unhandled
    return net.log.text()


def test_the_same_seed_gives_the_same_log_byte_for_byte() -> None:
    first = random_workload(7)
    second = random_workload(7)
    assert first.encode() == second.encode()
    assert len(first.splitlines()) > 2000
    for needle in ("cut h", "nats down", "bucket leases deleted", "lost in flight", "duplicate", "fold #",
                   "deliver REQ#", "lease rev=", "lost ack", "lost reply"):
        assert needle in first, needle  # the workload really exercised it
    assert random_workload(8) != first


def test_the_log_does_not_depend_on_the_process_hash_seed() -> None:
    # String hashing is randomized per process: a set or dict ordered by hash would show here.
    import hashlib
    import os
    import subprocess
    import sys

    script = (
        "import hashlib, sys; sys.path.insert(0, '.');"
        "from tests.test_sim_transport import random_workload;"
        "print(hashlib.sha256(random_workload(11, 30.0).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)}, cwd=os.path.dirname(os.path.dirname(__file__)),
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert digests == {hashlib.sha256(random_workload(11, 30.0).encode()).hexdigest()}


def test_no_real_time_is_read_during_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> float:
        raise AssertionError("the simulation read real time")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "sleep"):
        monkeypatch.setattr(time, name, forbidden)
    log = random_workload(3, seconds=10.0)
    assert log.count("\n") > 100  # the run did happen, on virtual time only




def test_a_compare_and_set_over_a_subject_filter_reads_the_last_message_of_every_subject_it_matches() -> None:
    """nats-server 2.11's ``Nats-Expected-Last-Subject-Sequence-Subject``, as real
    nats-server 2.15 answers it (tests/test_core_driver.py): each placement record on
    a subject of its own, one compare-and-set over them all; other subjects of the
    stream do not count, and a duplicate is acked before any check."""
    s, net = make()
    net.add_stream(StreamConfig("EV", ("ev.>",), duplicate_window=60.0))
    conn = net.connect("scheduler")
    of = {"Nats-Expected-Last-Subject-Sequence-Subject": "ev.rec.*"}

    def record(name: str, expect: int, msg_id: str = "") -> int:
        return wait(s, conn.js_publish(f"ev.rec.{name}", b"r", headers=of, msg_id=msg_id or name,
                                       expected_last_subject_seq=expect)).seq

    wait(s, conn.js_publish("ev.other", b"x"))
    first = record("a", 0)
    with pytest.raises(WrongLastSequence, match=r"ev\.rec\.\*"):
        record("b", 0)
    wait(s, conn.js_publish("ev.other", b"x"))
    second = record("b", first)
    assert record("a", 0) == first  # the same record again: its first copy's sequence
    with pytest.raises(WrongLastSequence):
        record("c", first)
    assert record("c", second) > second
