"""An in-memory NATS server and its clients, on the virtual clock, with faults.

Every client operation crosses a link: client to server (``up``) and server to
client (``down``), each with a latency drawn from the seeded PRNG. A link is FIFO
(a message never overtakes an earlier one on the same link) because a TCP
connection is; messages on different links may overtake each other, which is the
only reordering NATS allows. So:

* core messages from one publisher reach a subscriber in order; from two
  publishers, in any order; a core message may be lost (``Faults.core_loss``),
  never duplicated;
* JetStream delivers at least once: a lost ack (``Faults.ack_loss``) or a lost
  delivery means a redelivery after the ack wait; a publish whose reply is lost
  (``Faults.reply_loss``) was stored and the publisher cannot know it, so a retry
  stores it twice unless it carries a ``Nats-Msg-Id`` within the window;
* a node cut off (``cut``) loses what is in flight to and from it; its core
  subscriptions and ordered replays are re-made when it is healed, pull
  requests and replies it waits for time out;
* a NATS restart (``restart``) drops every connection, subscription, pull
  request and message in flight; streams, consumers (their pending messages
  too) and KV buckets survive, the de-duplication memory keeps only ids of
  messages still stored; clients reconnect and re-subscribe;
* ``delete_bucket`` loses a KV bucket; re-creating it restarts its revisions at 1;
* a node given publish grants (``publish_grants``, production's NATS permissions:
  ``hafence.sim.permissions``) may publish only on subjects they match, as
  nats-server enforces them: anything else is dropped at the server (a core
  message reaches nobody; a JetStream publish is not stored and gets no answer,
  so the client's request times out) and recorded in ``denied``. Replies to
  requests (``_INBOX.``) are allowed, as ``allow_responses`` does.

Operations while disconnected are lost, not buffered (nats-py buffers core
publishes during a reconnect; losing them is allowed for core NATS, and a
JetStream request simply times out). Administration (streams, consumers,
buckets) is applied at once, without the network, as provisioning at start-up is.

Every event is written to ``log`` as one line; the PRNG is the only source of
randomness and the scheduler the only source of time, so one seed gives one log.
"""

from __future__ import annotations

import inspect
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from hafence.sim.clock import NodeClock, Scheduler, SimFuture, Timer
from hafence.sim.ports import Metadata, SequencePair
from hafence.sim.streams import (
    MSG_ID,
    Bucket,
    ConsumerConfig,
    Delivered,
    Entry,
    JetStreamError,
    NoStream,
    OrderedCursor,
    PubAck,
    PullConsumer,
    StoredMsg,
    Stream,
    StreamConfig,
    StreamNotFound,
)
from hafence.sim.subjects import subject_matches, valid_subject

T = TypeVar("T")


class NoResponders(Exception):
    """A request found no subscriber on its subject (nats-py: NoRespondersError)."""


class AlreadyAcked(Exception):
    """ack, nak or term on a delivery already acknowledged (nats-py: MsgAlreadyAckdError)."""


class PermissionViolation(JetStreamError):
    """The sender may not publish on the subject (never answered: nats-server drops it)."""


class NotConnected(Exception):
    """An operation on a closed connection."""


@dataclass(frozen=True, slots=True)
class Faults:
    """Network behaviour; probabilities are per message. The defaults are a healthy LAN."""

    latency_min: float = 0.0002
    latency_max: float = 0.002
    spike_probability: float = 0.0  # a message held up (a GC pause, a congested switch) ...
    spike_max: float = 0.0  # ... by up to this long, still in order on its link
    core_loss: float = 0.0  # a core message lost on its way to one subscriber
    ack_loss: float = 0.0  # an ack, nak, in-progress or term lost on its way to the server
    reply_loss: float = 0.0  # a JetStream/KV reply lost after the server applied the operation
    reconnect_delay: float = 0.5  # from the server (or the node's network) coming back to reconnected
    # How long the server keeps a silent (cut off) client's subscriptions and pull requests:
    # nats-server notices a peer that stopped answering after two missed pings of 2 minutes.
    # Until then what it routes there is lost: a request times out, no "no responders".
    stale_after: float = 240.0


class EventLog:
    """The run's log: one line per event, time first. Same seed, same bytes."""

    def __init__(self, scheduler: Scheduler, keep: bool = True) -> None:
        self.scheduler = scheduler
        self.keep = keep
        self.lines: list[str] = []

    def __call__(self, who: str, what: str) -> None:
        if self.keep:
            self.lines.append(f"{self.scheduler.now:.6f} {who} {what}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _short(data: bytes) -> str:
    return repr(data[:40]) + ("..." if len(data) > 40 else "")


class Link:
    """One direction of one connection: FIFO, with latency; ``cut`` loses what is in flight."""

    def __init__(self, net: SimNats, name: str) -> None:
        self.net = net
        self.name = name
        self._last_arrival = 0.0
        self._epoch = 0
        self.open = False

    def send(self, what: str, deliver: Callable[..., object], *args: Any) -> None:
        if not self.open:
            self.net.log(self.name, f"lost, link down: {what}")
            return
        faults, rng = self.net.faults, self.net.rng
        delay = rng.uniform(faults.latency_min, faults.latency_max)
        if faults.spike_probability and rng.random() < faults.spike_probability:
            delay += rng.uniform(0.0, faults.spike_max)
        arrival = max(self.net.scheduler.now + delay, self._last_arrival)
        self._last_arrival = arrival
        self.net.scheduler.call_at(arrival, self._arrive, self._epoch, what, deliver, args)

    def _arrive(self, epoch: int, what: str, deliver: Callable[..., object], args: tuple[Any, ...]) -> None:
        if epoch != self._epoch:
            self.net.log(self.name, f"lost in flight: {what}")
            return
        deliver(*args)

    def cut(self) -> None:
        self.open = False
        self._epoch += 1
        self._last_arrival = 0.0

    def restore(self) -> None:
        self.open = True


@dataclass(eq=False)
class CoreMsg:
    """A core NATS message as a subscriber receives it (``ports.Request``)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str
    _conn: Connection

    async def respond(self, data: bytes) -> None:
        if not self.reply:
            raise ValueError(f"message on {self.subject} has no reply subject to respond to")
        self._conn.publish(self.reply, data)


@dataclass(eq=False)
class SimDelivery:
    """A JetStream delivery (``ports.Delivery``); acks go to the server over the link."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    metadata: Metadata
    _conn: Connection
    reply: str = ""
    _acked: bool = False

    def _send(self, kind: str, delay: float = 0.0, final: bool = True) -> None:
        if final:
            if self._acked:
                raise AlreadyAcked(
                    f"{kind} after the delivery of {self.metadata.stream}#{self.metadata.sequence.stream} "
                    "was already acknowledged"
                )
            self._acked = True
        meta = self.metadata
        self._conn._acknowledge(meta.stream, meta.consumer, meta.sequence.stream, kind, delay)

    async def ack(self) -> None:
        self._send("ack")

    async def nak(self, delay: float | None = None) -> None:
        self._send("nak", delay or 0.0)

    async def in_progress(self) -> None:
        self._send("in_progress", final=False)

    async def term(self) -> None:
        self._send("term")


@dataclass(eq=False)
class _ServerSub:
    conn: Connection
    gen: int  # the connection's generation: a sub of a stale generation receives nothing
    sid: int
    subject: str
    queue: str


@dataclass(eq=False)
class _PullRequest:
    conn: Connection
    gen: int
    stream: str
    durable: str
    rid: int
    batch: int
    expires: float  # server time


@dataclass(eq=False)
class _Feed:
    """An ordered consumer on the server, pushing to one client replay."""

    conn: Connection
    gen: int
    rid: int
    cursor: OrderedCursor


class SimNats:
    """The server: streams, consumers, buckets, subscriptions, and the faults."""

    def __init__(
        self,
        scheduler: Scheduler,
        rng: random.Random,
        faults: Faults | None = None,
        clock: NodeClock | None = None,
        log: EventLog | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.rng = rng
        self.faults = faults or Faults()
        self.clock = clock or NodeClock(scheduler, "nats")
        self.log = log or EventLog(scheduler)
        self.up = True
        self.streams: dict[str, Stream] = {}
        self.buckets: dict[str, Bucket] = {}
        self.connections: list[Connection] = []
        self._subs: list[_ServerSub] = []
        self._pulls: dict[tuple[str, str], deque[_PullRequest]] = {}
        self._feeds: list[_Feed] = []
        self._wakeups: dict[tuple[str, str], Timer] = {}
        self._cut_nodes: set[str] = set()
        self._ids = 0
        # node -> the subjects it may publish on; a node not in it may publish anywhere.
        self.publish_grants: dict[str, tuple[str, ...]] = {}
        self.denied: list[tuple[float, str, str]] = []  # (time, node, subject) refused
        # Told of every message a stream stores (not of duplicates): subject, body.
        self.on_stored: list[Callable[[str, bytes], None]] = []
        self._allowed: dict[tuple[str, str], bool] = {}

    def may_publish(self, sender: Connection | None, subject: str) -> bool:
        """nats-server's publish permission check, by the sender's node."""
        if sender is None or subject.startswith("_INBOX."):
            return True
        grants = self.publish_grants.get(sender.node)
        if grants is None:
            return True
        key = (sender.node, subject)
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = any(subject_matches(p, subject) for p in grants)
        if not allowed:
            self.denied.append((self.scheduler.now, sender.node, subject))
            self.log(sender.name, f"permissions violation for publish to {subject}")
        return allowed

    def now(self) -> float:
        """The server's time, which stamps stored messages and measures ages and ack waits."""
        return self.clock.wall()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- administration (instant, no network) -----------------------------------------
    def add_stream(self, config: StreamConfig) -> Stream:
        for other in self.streams.values():
            if other.config.name == config.name:
                raise JetStreamError(f"stream {config.name} already exists")
            for mine in config.subjects:
                for theirs in other.config.subjects:
                    if _overlap(mine, theirs):
                        raise JetStreamError(
                            f"stream {config.name}: subjects {mine!r} overlap {theirs!r} of stream {other.config.name}"
                        )
        stream = Stream(config)
        self.streams[config.name] = stream
        self.log("nats", f"stream {config.name} created")
        return stream

    def delete_stream(self, name: str) -> None:
        self._stream(name)
        del self.streams[name]
        self._feeds = [f for f in self._feeds if f.cursor.stream.config.name != name]
        self.log("nats", f"stream {name} deleted")

    def add_consumer(self, stream: str, config: ConsumerConfig) -> PullConsumer:
        s = self._stream(stream)
        if config.durable in s.consumers:
            return s.consumers[config.durable]  # idempotent, like provisioning
        consumer = PullConsumer(s, config)
        s.consumers[config.durable] = consumer
        return consumer

    def create_bucket(self, name: str, ttl: float = 0.0, history: int = 1) -> Bucket:
        if name not in self.buckets:
            self.buckets[name] = Bucket(name, ttl, history)
            self.log("nats", f"bucket {name} created ttl={ttl:g}")
        return self.buckets[name]

    def delete_bucket(self, name: str) -> None:
        """The bucket is lost (an operator, a storage failure): every key and its revision."""
        if self.buckets.pop(name, None) is not None:
            self.log("nats", f"bucket {name} deleted")

    def _stream(self, name: str) -> Stream:
        try:
            return self.streams[name]
        except KeyError:
            raise StreamNotFound(f"stream {name} not found") from None

    def _bucket(self, name: str) -> Bucket:
        try:
            return self.buckets[name]
        except KeyError:
            raise StreamNotFound(f"bucket {name} not found") from None

    # -- clients and faults --------------------------------------------------------
    def connect(self, node: str, clock: NodeClock | None = None) -> Connection:
        conn = Connection(self, node, f"{node}#{self.next_id()}", clock or NodeClock(self.scheduler, node))
        self.connections.append(conn)
        if self.up and node not in self._cut_nodes:
            conn._on_connected()
        else:
            self.log(conn.name, "connecting (the server is out of reach)")
        return conn

    def cut(self, node: str) -> None:
        """The node loses its network path to NATS (both directions)."""
        self._cut_nodes.add(node)
        self.log("fault", f"cut {node}")
        for conn in self.connections:
            if conn.node == node and conn.connected:
                conn._drop("cut off")
                # The server notices only later; what it sends there until then is lost.
                self.scheduler.call_later(self.faults.stale_after, self._forget, conn, conn.generation)

    def heal(self, node: str) -> None:
        self._cut_nodes.discard(node)
        self.log("fault", f"heal {node}")
        if self.up:
            for conn in self.connections:
                if conn.node == node and not conn.closed:
                    self.scheduler.call_later(self.faults.reconnect_delay, self._reconnect, conn)

    def restart(self, down_for: float) -> None:
        """NATS stops and starts again ``down_for`` seconds later (file storage survives)."""
        if not self.up:
            return
        self.up = False
        self.log("fault", f"nats down for {down_for:g}s")
        for conn in self.connections:
            self._disconnect(conn, "server down")
        self._pulls.clear()
        for timer in self._wakeups.values():
            timer.cancel()
        self._wakeups.clear()
        self.scheduler.call_later(down_for, self._start)

    def _start(self) -> None:
        self.up = True
        for stream in self.streams.values():
            stream.rebuild_dedup()
        for bucket in self.buckets.values():
            bucket.stream.rebuild_dedup()
        self.log("nats", "up again")
        for conn in self.connections:
            if not conn.closed and conn.node not in self._cut_nodes:
                self.scheduler.call_later(self.faults.reconnect_delay, self._reconnect, conn)

    def _disconnect(self, conn: Connection, why: str) -> None:
        self._forget(conn, conn.generation)
        conn._drop(why)

    def _forget(self, conn: Connection, generation: int) -> None:
        """Drop the server's state for ``conn`` up to ``generation`` (the connection is gone)."""
        if any(s.conn is conn and s.gen <= generation for s in self._subs):
            self.log("nats", f"forgets {conn.name} (generation {generation})")
        self._subs = [s for s in self._subs if not (s.conn is conn and s.gen <= generation)]
        self._feeds = [f for f in self._feeds if not (f.conn is conn and f.gen <= generation)]
        for key, waiting in self._pulls.items():
            self._pulls[key] = deque(r for r in waiting if not (r.conn is conn and r.gen <= generation))

    def _reconnect(self, conn: Connection) -> None:
        if conn.closed or conn.connected or not self.up or conn.node in self._cut_nodes:
            return
        conn._on_connected()

    # -- server side of client operations (called when a message arrives up a link) -----
    def _register_sub(self, conn: Connection, gen: int, sid: int, subject: str, queue: str) -> None:
        self._subs.append(_ServerSub(conn, gen, sid, subject, queue))

    def _unregister_sub(self, conn: Connection, sid: int) -> None:
        self._subs = [s for s in self._subs if not (s.conn is conn and s.sid == sid)]

    def _route(
        self, subject: str, data: bytes, headers: dict[str, str] | None, reply: str, sender: Connection,
        quiet: bool = False,
    ) -> None:
        if not quiet and not self.may_publish(sender, subject):
            return
        receivers: list[_ServerSub] = []
        groups: dict[str, list[_ServerSub]] = {}
        for sub in self._subs:
            if subject_matches(sub.subject, subject):
                if sub.queue:
                    groups.setdefault(sub.queue, []).append(sub)
                else:
                    receivers.append(sub)
        for members in groups.values():
            receivers.append(members[self.rng.randrange(len(members))])  # NATS picks a member at random
        if not quiet or receivers:
            self.log(sender.name, f"pub {subject} {_short(data)} -> {len(receivers)}")
        if not receivers and reply and sender.connected:
            # No responders: the server answers the request itself, at once.
            sender.down.send(f"no responders {subject}", sender._no_responders, reply)
            return
        for sub in receivers:
            if self.faults.core_loss and self.rng.random() < self.faults.core_loss:
                self.log(sub.conn.name, f"lost core {subject}")
                continue
            if sub.gen != sub.conn.generation:
                self.log(sub.conn.name, f"lost to a stale connection: core {subject}")
                continue
            msg_headers = dict(headers) if headers else None
            sub.conn.down.send(f"core {subject}", sub.conn._deliver_core, sub.sid, subject, data, msg_headers, reply)

    def _js_publish(
        self, subject: str, data: bytes, headers: dict[str, str], expected_last_subject_seq: int | None,
        sender: Connection | None = None,
    ) -> PubAck:
        if not self.may_publish(sender, subject):
            raise PermissionViolation(f"permissions violation for publish to {subject}")
        for stream in self.streams.values():
            if stream.owns(subject):
                ack = stream.store(subject, data, headers, self.now(), expected_last_subject_seq)
                dup = " duplicate" if ack.duplicate else ""
                self.log("nats", f"stored {stream.config.name}#{ack.seq}{dup} {subject} {_short(data)}")
                if not ack.duplicate:
                    for hook in self.on_stored:
                        hook(subject, data)
                    for durable in stream.consumers:
                        self._pump(stream.config.name, durable)
                    self._push_feeds(stream)
                if sender is not None:
                    # A JetStream publish is a message on its subject: core subscribers get
                    # it too (the agent hears its "cleared" on a plain subscription), also
                    # when the stream drops it as a duplicate.
                    self._route(subject, data, dict(headers) or None, "", sender, quiet=True)
                return ack
        raise NoStream(f"no stream for subject {subject}")

    def _pull(self, request: _PullRequest) -> None:
        self._pulls.setdefault((request.stream, request.durable), deque()).append(request)
        self._pump(request.stream, request.durable)

    def _pump(self, stream_name: str, durable: str) -> None:
        """Hand what the consumer can deliver to the oldest live pull requests."""
        if not self.up:
            return
        stream = self.streams.get(stream_name)
        waiting = self._pulls.get((stream_name, durable))
        if stream is None or durable not in stream.consumers or not waiting:
            return
        consumer = stream.consumers[durable]
        now = self.now()
        while waiting:
            request = waiting[0]
            if request.expires <= now:
                waiting.popleft()
                continue
            batch: list[Delivered] = []
            while len(batch) < request.batch:
                delivered = consumer.next_delivery(now)
                if delivered is None:
                    break
                batch.append(delivered)
            if not batch:
                break
            waiting.popleft()
            for d in batch:
                self.log("nats", f"deliver {stream_name}#{d.msg.seq} to {request.conn.name} n={d.num_delivered}")
            if request.gen != request.conn.generation:
                self.log(request.conn.name, f"lost to a stale connection: fetch {durable}")
                continue
            request.conn.down.send(
                f"fetch {durable}", request.conn._deliver_pull, request.rid, stream_name, durable, batch
            )
        self._schedule_wakeup(stream_name, durable, consumer, waiting)

    def _schedule_wakeup(
        self, stream_name: str, durable: str, consumer: PullConsumer, waiting: deque[_PullRequest]
    ) -> None:
        """With requests waiting, look again when a redelivery falls due or a request expires."""
        key = (stream_name, durable)
        old = self._wakeups.pop(key, None)
        if old is not None:
            old.cancel()
        if not waiting:
            return
        times = [r.expires for r in waiting]
        deadline = consumer.next_deadline()
        if deadline is not None:
            times.append(deadline)
        # A microsecond late, so that float rounding between the server's clock and
        # simulated time can never wake it just before the deadline, again and again.
        delay = max(0.0, min(times) - self.now()) + 1e-6
        self._wakeups[key] = self.clock.call_later(delay, self._pump, stream_name, durable)

    def _acknowledge(self, stream_name: str, durable: str, seq: int, kind: str, delay: float) -> None:
        stream = self.streams.get(stream_name)
        if stream is None or durable not in stream.consumers:
            return
        consumer, now = stream.consumers[durable], self.now()
        self.log("nats", f"{kind} {stream_name}#{seq}" + (f" delay={delay:g}" if delay else ""))
        if kind == "ack":
            consumer.ack(seq)
        elif kind == "term":
            consumer.term(seq)
        elif kind == "nak":
            consumer.nak(seq, now, delay)
        elif kind == "in_progress":
            consumer.in_progress(seq, now)
        self._pump(stream_name, durable)

    def _open_feed(
        self, conn: Connection, gen: int, rid: int, stream_name: str, filters: tuple[str, ...], from_seq: int
    ) -> None:
        stream = self.streams.get(stream_name)
        if stream is None:
            conn.down.send("replay: no stream", conn._replay_failed, rid, f"stream {stream_name} not found")
            return
        stream.expire(self.now())
        feed = _Feed(conn, gen, rid, OrderedCursor(stream, filters, from_seq))
        self._feeds.append(feed)
        # What consumer info would say at subscribe time: nothing left means caught up already.
        pending = stream.pending_after(from_seq - 1, filters)
        conn.down.send("replay opened", conn._replay_opened, rid, pending)
        self._push_feed(feed)

    def _push_feeds(self, stream: Stream) -> None:
        for feed in self._feeds:
            if feed.cursor.stream is stream:
                self._push_feed(feed)

    def _push_feed(self, feed: _Feed) -> None:
        if feed.gen != feed.conn.generation:
            return  # a stale connection's feed: the client re-opens its replay when it reconnects
        while (item := feed.cursor.next(self.now())) is not None:
            msg, pending = item
            feed.conn.down.send(f"replay #{msg.seq}", feed.conn._deliver_replay, feed.rid, msg, pending)


def _overlap(a: str, b: str) -> bool:
    """Whether two subject filters can match a common subject."""
    ta, tb = a.split("."), b.split(".")
    for i in range(max(len(ta), len(tb))):
        x = ta[i] if i < len(ta) else None
        y = tb[i] if i < len(tb) else None
        if x == ">" or y == ">":
            return x is not None and y is not None
        if x is None or y is None:
            return False
        if x != y and "*" not in (x, y):
            return False
    return True


class Subscription:
    """A core subscription; ``callback`` gets a ``CoreMsg`` (a coroutine it returns runs as a task)."""

    def __init__(
        self, conn: Connection, sid: int, subject: str, queue: str, callback: Callable[[CoreMsg], Any]
    ) -> None:
        self.conn = conn
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self.callback = callback
        self.received = 0

    def unsubscribe(self) -> None:
        if self.conn._subs.pop(self.sid, None) is not None:
            self.conn.up.send(f"unsub {self.subject}", self.conn.net._unregister_sub, self.conn, self.sid)


class PullSubscription:
    """The client side of a durable pull consumer."""

    def __init__(self, conn: Connection, stream: str, durable: str) -> None:
        self.conn = conn
        self.stream = stream
        self.durable = durable
        self._waiting: dict[int, SimFuture[list[SimDelivery]]] = {}
        # Deliveries that arrived after their fetch timed out: the next fetch returns them
        # (nats-py keeps them in the subscription's queue the same way). Their ack wait runs.
        self._late: list[SimDelivery] = []

    def fetch(self, batch: int = 1, timeout: float = 5.0) -> SimFuture[list[SimDelivery]]:
        """Up to ``batch`` messages as soon as at least one is there; TimeoutError if none in time."""
        fut: SimFuture[list[SimDelivery]] = self.conn.scheduler.future(f"fetch {self.durable}")
        if self._late:
            out, self._late = self._late[:batch], self._late[batch:]
            fut.set_result(out)
            return fut
        rid = self.conn.net.next_id()
        self._waiting[rid] = fut
        self.conn.clock.call_later(timeout, self._expire, rid)
        if self.conn.connected:
            expires = self.conn.net.now() + timeout
            self.conn.up.send(
                f"pull {self.durable}",
                self.conn.net._pull,
                _PullRequest(self.conn, self.conn.generation, self.stream, self.durable, rid, batch, expires),
            )
        return fut

    def _expire(self, rid: int) -> None:
        fut = self._waiting.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError(f"fetch from {self.stream}/{self.durable}: nothing within the timeout"))

    def _arrived(self, rid: int, deliveries: list[SimDelivery]) -> None:
        fut = self._waiting.pop(rid, None)
        if fut is None or fut.done():
            self._late.extend(deliveries)
        else:
            fut.set_result(deliveries)


class Replay:
    """An ordered replay of a stream from its beginning, then following it.

    ``callback`` gets every matching message once, in stream order, as a
    ``SimDelivery`` (nothing to ack). ``caught_up`` is done once the history at
    subscribe time has been handed over: the stream held nothing matching, or a
    message arrived with ``num_pending == 0`` (replay.py's rule)."""

    def __init__(
        self, conn: Connection, stream: str, filters: tuple[str, ...], callback: Callable[[SimDelivery], Any]
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.filters = filters
        self.callback = callback
        self.caught_up: SimFuture[None] = conn.scheduler.future(f"caught up {stream}")
        self.last_seq = 0
        self.rid = conn.net.next_id()
        self.error: str = ""
        self._delivered = 0

    def _open(self) -> None:
        self.conn.up.send(
            f"replay {self.stream}", self.conn.net._open_feed, self.conn, self.conn.generation, self.rid,
            self.stream, self.filters, self.last_seq + 1,
        )


class KV:
    """A client's handle on a bucket; every operation is a round trip that may time out."""

    def __init__(self, conn: Connection, bucket: str) -> None:
        self.conn = conn
        self.bucket = bucket

    def get(self, key: str, timeout: float = 2.0) -> SimFuture[Entry]:
        return self.conn._api(f"kv get {self.bucket}.{key}", lambda: self._b().get(key, self._now()), timeout)

    def put(self, key: str, value: bytes, timeout: float = 2.0) -> SimFuture[int]:
        return self.conn._api(f"kv put {self.bucket}.{key}", lambda: self._b().put(key, value, self._now()), timeout)

    def create(self, key: str, value: bytes, timeout: float = 2.0) -> SimFuture[int]:
        return self.conn._api(
            f"kv create {self.bucket}.{key}", lambda: self._b().create(key, value, self._now()), timeout
        )

    def update(self, key: str, value: bytes, last: int | None = None, timeout: float = 2.0) -> SimFuture[int]:
        return self.conn._api(
            f"kv update {self.bucket}.{key} last={last or 0}",
            lambda: self._b().update(key, value, last or 0, self._now()),
            timeout,
        )

    def delete(self, key: str, last: int | None = None, timeout: float = 2.0) -> SimFuture[int]:
        return self.conn._api(
            f"kv delete {self.bucket}.{key}", lambda: self._b().delete(key, self._now(), last), timeout
        )

    def purge(self, key: str, timeout: float = 2.0) -> SimFuture[int]:
        return self.conn._api(f"kv purge {self.bucket}.{key}", lambda: self._b().purge(key, self._now()), timeout)

    def _b(self) -> Bucket:
        return self.conn.net._bucket(self.bucket)

    def _now(self) -> float:
        return self.conn.net.now()


class Connection:
    """One client connection of one node."""

    def __init__(self, net: SimNats, node: str, name: str, clock: NodeClock) -> None:
        self.net = net
        self.node = node
        self.name = name
        self.clock = clock
        self.scheduler = net.scheduler
        self.up = Link(net, f"{name}>nats")
        self.down = Link(net, f"nats>{name}")
        self.connected = False
        self.closed = False
        self.generation = 0  # one per (re)connection
        self._sids = 0
        self._subs: dict[int, Subscription] = {}
        self._pulls: dict[str, PullSubscription] = {}
        self._replays: dict[int, Replay] = {}
        self._requests: dict[str, SimFuture[CoreMsg]] = {}
        self._inbox = f"_INBOX.{name.replace('#', '_')}"

    def __repr__(self) -> str:
        return f"<Connection {self.name} {'connected' if self.connected else 'disconnected'}>"

    # -- lifecycle ---------------------------------------------------------------------
    def _on_connected(self) -> None:
        self.connected = True
        self.generation += 1
        self.up.restore()
        self.down.restore()
        self.net.log(self.name, "connected")
        # What nats-py does on every (re)connect: re-subscribe, and its ordered consumers reset.
        self.net._register_sub(self, self.generation, 0, f"{self._inbox}.*", "")
        for sub in self._subs.values():
            self.net._register_sub(self, self.generation, sub.sid, sub.subject, sub.queue)
        for replay in self._replays.values():
            replay._open()  # from the last sequence it handed over, + 1

    def _drop(self, why: str) -> None:
        if self.connected:
            self.net.log(self.name, f"disconnected: {why}")
        self.connected = False
        self.up.cut()
        self.down.cut()

    def close(self) -> None:
        """The process exits (a crash or a stop): nothing of it stays subscribed."""
        if self.closed:
            return
        self.net._disconnect(self, "closed")
        self.closed = True
        self._subs.clear()
        self._replays.clear()

    # -- core NATS --------------------------------------------------------------------
    def publish(self, subject: str, data: bytes = b"", headers: dict[str, str] | None = None, reply: str = "") -> None:
        """Fire and forget; lost if the connection is down."""
        if not valid_subject(subject):
            raise ValueError(f"invalid subject to publish on: {subject!r}")
        if self.closed:
            raise NotConnected(f"{self.name} is closed")
        if not self.connected:
            self.net.log(self.name, f"lost while disconnected: pub {subject}")
            return
        self.up.send(f"pub {subject}", self.net._route, subject, data, headers, reply, self)

    def subscribe(self, subject: str, callback: Callable[[CoreMsg], Any], queue: str = "") -> Subscription:
        if self.closed:
            raise NotConnected(f"{self.name} is closed")
        self._sids += 1
        sub = Subscription(self, self._sids, subject, queue, callback)
        self._subs[sub.sid] = sub
        if self.connected:
            self.up.send(f"sub {subject}", self.net._register_sub, self, self.generation, sub.sid, subject, queue)
        return sub

    def request(
        self, subject: str, data: bytes = b"", headers: dict[str, str] | None = None, timeout: float = 1.0
    ) -> SimFuture[CoreMsg]:
        """The first reply; NoResponders if nobody listens; TimeoutError if no reply in time."""
        inbox = f"{self._inbox}.{self.net.next_id()}"
        fut: SimFuture[CoreMsg] = self.scheduler.future(f"request {subject}")
        self._requests[inbox] = fut

        def expire() -> None:
            if self._requests.pop(inbox, None) is not None and not fut.done():
                fut.set_exception(TimeoutError(f"request on {subject}: no reply within {timeout:g}s"))

        self.clock.call_later(timeout, expire)
        self.publish(subject, data, headers, reply=inbox)
        return fut

    def _deliver_core(
        self, sid: int, subject: str, data: bytes, headers: dict[str, str] | None, reply: str
    ) -> None:
        if sid == 0:
            fut = self._requests.pop(subject, None)
            if fut is not None and not fut.done():
                fut.set_result(CoreMsg(subject, data, headers, "", self))
            return
        sub = self._subs.get(sid)
        if sub is None:
            return  # unsubscribed while it was in flight
        sub.received += 1
        self.net.log(self.name, f"recv {subject} {_short(data)}")
        self._call(sub.callback, CoreMsg(subject, data, headers, reply, self))

    def _no_responders(self, inbox: str) -> None:
        fut = self._requests.pop(inbox, None)
        if fut is not None and not fut.done():
            fut.set_exception(NoResponders(f"no responders for the request answered on {inbox}"))

    def _call(self, callback: Callable[[Any], Any], arg: Any) -> None:
        result = callback(arg)
        if inspect.iscoroutine(result):
            self.scheduler.spawn(result, f"{self.name} handler")

    # -- JetStream --------------------------------------------------------------------
    def _api(self, what: str, operation: Callable[[], T], timeout: float) -> SimFuture[T]:
        """A request to the server's API: applied when it arrives, answered back down."""
        fut: SimFuture[T] = self.scheduler.future(what)

        def expire() -> None:
            if not fut.done():
                fut.set_exception(TimeoutError(f"{what}: no answer within {timeout:g}s"))

        def answer(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            timer.cancel()  # answered: its expiry need not run (a step saved per operation)
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        def at_server() -> None:
            try:
                result, error = operation(), None
            except PermissionViolation:
                return  # the server drops it and answers nothing: the request times out
            except JetStreamError as err:
                result, error = None, err
            self.net.log(self.name, f"{what} -> {error!r}" if error else f"{what} -> {result!r}")
            if self.net.faults.reply_loss and self.net.rng.random() < self.net.faults.reply_loss:
                self.net.log(self.name, f"lost reply: {what}")
                return
            self.down.send(f"reply {what}", answer, result, error)

        timer = self.clock.call_later(timeout, expire)
        if self.connected:
            self.up.send(what, at_server)
        else:
            self.net.log(self.name, f"lost while disconnected: {what}")
        return fut

    def js_publish(
        self,
        subject: str,
        data: bytes = b"",
        headers: dict[str, str] | None = None,
        msg_id: str = "",
        timeout: float = 5.0,
        expected_last_subject_seq: int | None = None,
    ) -> SimFuture[PubAck]:
        """Store in the stream that owns ``subject``; the PubAck says where (or that it was a duplicate)."""
        if not valid_subject(subject):
            raise ValueError(f"invalid subject to publish on: {subject!r}")
        hdrs = dict(headers or {})
        if msg_id:
            hdrs[MSG_ID] = msg_id
        return self._api(
            f"js pub {subject}" + (f" id={msg_id}" if msg_id else ""),
            lambda: self.net._js_publish(subject, data, hdrs, expected_last_subject_seq, self),
            timeout,
        )

    def pull_subscribe(self, stream: str, durable: str) -> PullSubscription:
        key = f"{stream}/{durable}"
        if key not in self._pulls:
            self._pulls[key] = PullSubscription(self, stream, durable)
        return self._pulls[key]

    def _deliver_pull(self, rid: int, stream: str, durable: str, batch: list[Delivered]) -> None:
        pull = self._pulls.get(f"{stream}/{durable}")
        if pull is None:
            return
        deliveries = [
            self._delivery(stream, d.msg, d.num_delivered, d.consumer_seq, d.num_pending, durable) for d in batch
        ]
        self.net.log(self.name, f"fetched {stream}{[d.metadata.sequence.stream for d in deliveries]}")
        pull._arrived(rid, deliveries)

    def _delivery(
        self, stream: str, msg: StoredMsg, num_delivered: int, consumer_seq: int, num_pending: int, consumer: str
    ) -> SimDelivery:
        return SimDelivery(
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers) or None,
            metadata=Metadata(
                sequence=SequencePair(consumer=consumer_seq, stream=msg.seq),
                num_pending=num_pending,
                num_delivered=num_delivered,
                timestamp=Metadata.stored_at(msg.time),
                stream=stream,
                consumer=consumer,
            ),
            _conn=self,
        )

    def _acknowledge(self, stream: str, durable: str, seq: int, kind: str, delay: float) -> None:
        if not self.connected:
            self.net.log(self.name, f"lost while disconnected: {kind} {stream}#{seq}")
            return
        if self.net.faults.ack_loss and self.net.rng.random() < self.net.faults.ack_loss:
            self.net.log(self.name, f"lost {kind} {stream}#{seq}")
            return
        self.up.send(f"{kind} {stream}#{seq}", self.net._acknowledge, stream, durable, seq, kind, delay)

    def replay(
        self, stream: str, filters: list[str] | tuple[str, ...], callback: Callable[[SimDelivery], Any]
    ) -> Replay:
        """Fold ``stream`` from its beginning, then follow it (see ``Replay``)."""
        replay = Replay(self, stream, tuple(filters), callback)
        if self.connected:
            replay._open()
        self._replays[replay.rid] = replay
        return replay

    def _replay_opened(self, rid: int, pending: int) -> None:
        replay = self._replays.get(rid)
        if replay is not None and pending == 0 and not replay.caught_up.done():
            replay.caught_up.set_result(None)

    def _replay_failed(self, rid: int, error: str) -> None:
        replay = self._replays.get(rid)
        if replay is not None:
            replay.error = error
            self.net.log(self.name, f"replay failed: {error}")

    def _deliver_replay(self, rid: int, msg: StoredMsg, pending: int) -> None:
        replay = self._replays.get(rid)
        if replay is None or msg.seq <= replay.last_seq:
            return  # a feed this client has already replaced
        replay.last_seq = msg.seq
        replay._delivered += 1
        delivery = self._delivery(replay.stream, msg, 1, replay._delivered, pending, "")
        self._call(replay.callback, delivery)
        if pending == 0 and not replay.caught_up.done():
            replay.caught_up.set_result(None)

    def key_value(self, bucket: str) -> KV:
        return KV(self, bucket)
