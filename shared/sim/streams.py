"""JetStream storage as plain data: streams, de-duplication, limits, consumers, KV.

No network and no scheduling here: every method takes the server's wall time
``now`` and returns what happened. ``transport`` puts these behind links with
latency and faults. The semantics follow nats-server 2.10 as hafence uses it, and
were checked against a real server where noted (tests/test_sim_transport.py):

* a stream's sequence only grows; deleting and re-creating a stream (or a KV
  bucket, which is a stream) starts it again at 1;
* ``Nats-Msg-Id`` de-duplicates within ``duplicate_window`` of the original's
  store time, even after the original was acked away from a work queue; a server
  restart rebuilds that memory from the messages still stored (checked: an acked
  work-queue message's id is forgotten by a restart);
* ack, nak, in-progress and term apply to the stream sequence, whichever delivery
  of it they came from (checked: an ack from an expired delivery still acks; a
  stale in-progress extends the new delivery's ack wait);
* term and ack remove a work-queue message; a message past ``max_deliver`` stays
  in the stream and is never delivered again (checked);
* ``max_age`` and ``max_msgs_per_subject`` drop the oldest messages. Expiry here is
  exact (at store time + max_age, applied lazily on every access); the real server
  expires on a timer and may keep a message a little longer.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from hafence.sim.subjects import matches_any, subject_matches

MSG_ID = "Nats-Msg-Id"
# nats-server 2.11: the compare-and-set reads the last message of these subjects (a filter).
EXPECTED_LAST_OF = "Nats-Expected-Last-Subject-Sequence-Subject"
KV_OPERATION = "KV-Operation"


class JetStreamError(Exception):
    """An error the server returns for a JetStream request."""


class NoStream(JetStreamError):
    """No stream listens on the subject (nats-py: NoStreamResponseError)."""


class WrongLastSequence(JetStreamError):
    """Expected-last-subject-sequence did not hold (nats-py: KeyWrongLastSequenceError, code 10071)."""


class StreamNotFound(JetStreamError):
    """The stream (or KV bucket) does not exist (nats-py: NotFoundError / BucketNotFoundError)."""


class KeyNotFound(JetStreamError):
    """No value for the key: never written, deleted, purged or expired (nats-py: KeyNotFoundError)."""


@dataclass(frozen=True, slots=True)
class StreamConfig:
    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue"] = "limits"
    max_msgs_per_subject: int = -1
    max_age: float = 0.0  # seconds; 0 keeps messages forever
    duplicate_window: float = 120.0  # nats-server's default


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    durable: str
    filter_subjects: tuple[str, ...] = ()
    ack_wait: float = 30.0
    max_deliver: int = -1  # -1: redeliver forever
    max_ack_pending: int = 1000


@dataclass(frozen=True, slots=True)
class StoredMsg:
    seq: int
    subject: str
    data: bytes
    headers: tuple[tuple[str, str], ...]
    time: float  # server wall time when stored

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class PubAck:
    stream: str
    seq: int
    duplicate: bool = False


class Stream:
    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.msgs: OrderedDict[int, StoredMsg] = OrderedDict()  # by sequence, oldest first
        self.last_seq = 0
        self._last_by_subject: dict[str, int] = {}
        self._count_by_subject: dict[str, int] = {}
        self._dedup: OrderedDict[str, tuple[int, float]] = OrderedDict()  # msg id -> (seq, stored at)
        self.consumers: dict[str, PullConsumer] = {}

    def owns(self, subject: str) -> bool:
        return any(subject_matches(p, subject) for p in self.config.subjects)

    # -- storing ---------------------------------------------------------------
    def store(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str],
        now: float,
        expected_last_subject_seq: int | None = None,
    ) -> PubAck:
        self.expire(now)
        msg_id = headers.get(MSG_ID, "")
        if msg_id:
            seen = self._dedup.get(msg_id)
            if seen is not None and now - seen[1] < self.config.duplicate_window:
                return PubAck(self.config.name, seen[0], duplicate=True)
        if expected_last_subject_seq is not None:
            of = headers.get(EXPECTED_LAST_OF, "")
            last = (max((seq for subj, seq in self._last_by_subject.items() if subject_matches(of, subj)), default=0)
                    if of else self._last_by_subject.get(subject, 0))
            if last != expected_last_subject_seq:
                raise WrongLastSequence(
                    f"wrong last sequence for {of or subject} in {self.config.name}: "
                    f"{last}, expected {expected_last_subject_seq}"
                )
        self.last_seq += 1
        msg = StoredMsg(self.last_seq, subject, data, tuple(sorted(headers.items())), now)
        self.msgs[msg.seq] = msg
        self._last_by_subject[subject] = msg.seq
        self._count_by_subject[subject] = self._count_by_subject.get(subject, 0) + 1
        if msg_id:
            self._dedup[msg_id] = (msg.seq, now)
            self._dedup.move_to_end(msg_id)
        limit = self.config.max_msgs_per_subject
        excess = self._count_by_subject[subject] - limit if limit > 0 else 0
        if excess > 0:
            for seq in [s for s, m in self.msgs.items() if m.subject == subject][:excess]:
                self.remove(seq)
        return PubAck(self.config.name, msg.seq)

    def remove(self, seq: int) -> None:
        msg = self.msgs.pop(seq, None)
        if msg is None:
            return
        left = self._count_by_subject[msg.subject] - 1
        if left:
            self._count_by_subject[msg.subject] = left
        else:
            del self._count_by_subject[msg.subject]
        if self._last_by_subject.get(msg.subject) == seq:
            # The subject's last sequence is now its newest remaining message, or none.
            newer = [s for s, m in self.msgs.items() if m.subject == msg.subject]
            if newer:
                self._last_by_subject[msg.subject] = newer[-1]
            else:
                del self._last_by_subject[msg.subject]

    def purge_subject(self, subject: str, keep_seq: int) -> None:
        """Remove every message on ``subject`` except ``keep_seq`` (a KV purge's rollup)."""
        for seq in [s for s, m in self.msgs.items() if m.subject == subject and s != keep_seq]:
            self.remove(seq)

    def expire(self, now: float) -> None:
        """Drop messages older than max_age, and de-duplication ids older than the window."""
        if self.config.max_age > 0:
            while self.msgs:
                seq, msg = next(iter(self.msgs.items()))
                if now - msg.time < self.config.max_age:
                    break
                self.remove(seq)
        while self._dedup:
            msg_id, (_, at) = next(iter(self._dedup.items()))
            if now - at < self.config.duplicate_window:
                break
            del self._dedup[msg_id]

    def rebuild_dedup(self) -> None:
        """After a server restart: only ids of messages still stored are remembered."""
        self._dedup = OrderedDict(
            (msg_id, seen) for msg_id, seen in self._dedup.items() if seen[0] in self.msgs
        )

    def last_for_subject(self, subject: str) -> StoredMsg | None:
        seq = self._last_by_subject.get(subject)
        return self.msgs[seq] if seq is not None else None

    def pending_after(self, seq: int, filters: tuple[str, ...]) -> int:
        """Stored messages matching ``filters`` with a sequence above ``seq``."""
        return sum(1 for s, m in self.msgs.items() if s > seq and matches_any(filters, m.subject))

    def next_matching(self, from_seq: int, filters: tuple[str, ...]) -> StoredMsg | None:
        """The first stored message at or after ``from_seq`` matching ``filters``."""
        for s, m in self.msgs.items():
            if s >= from_seq and matches_any(filters, m.subject):
                return m
        return None


@dataclass(slots=True)
class Pending:
    """A delivered, unacknowledged message: eligible for redelivery from ``deadline`` on."""

    deadline: float
    delivered: int  # deliveries so far


@dataclass(frozen=True, slots=True)
class Delivered:
    msg: StoredMsg
    num_delivered: int
    consumer_seq: int
    num_pending: int


@dataclass
class PullConsumer:
    """A durable pull consumer with explicit acks, delivering from the stream's start."""

    stream: Stream
    config: ConsumerConfig
    next_seq: int = 1  # the next stream sequence never delivered yet
    consumer_seq: int = 0  # deliveries made, redeliveries included
    pending: dict[int, Pending] = field(default_factory=dict)
    dead: set[int] = field(default_factory=set)  # sequences past max_deliver

    def next_delivery(self, now: float) -> Delivered | None:
        """The next message to hand to a waiting pull request: redeliveries first."""
        self.stream.expire(now)
        self._drop_gone()
        due = sorted((p.deadline, seq) for seq, p in self.pending.items() if p.deadline <= now)
        for _, seq in due:
            pending = self.pending[seq]
            if 0 < self.config.max_deliver <= pending.delivered:
                del self.pending[seq]
                self.dead.add(seq)
                continue
            pending.delivered += 1
            pending.deadline = now + self.config.ack_wait
            return self._delivered(self.stream.msgs[seq], pending.delivered)
        if len(self.pending) >= self.config.max_ack_pending:
            return None
        msg = self.stream.next_matching(self.next_seq, self.config.filter_subjects)
        if msg is None:
            return None
        self.next_seq = msg.seq + 1
        self.pending[msg.seq] = Pending(now + self.config.ack_wait, 1)
        return self._delivered(msg, 1)

    def _delivered(self, msg: StoredMsg, delivered: int) -> Delivered:
        self.consumer_seq += 1
        num_pending = self.stream.pending_after(self.next_seq - 1, self.config.filter_subjects)
        return Delivered(msg, delivered, self.consumer_seq, num_pending)

    def next_deadline(self) -> float | None:
        """When a pending message next becomes eligible for redelivery (or max deliver)."""
        return min((p.deadline for p in self.pending.values()), default=None)

    def _drop_gone(self) -> None:
        for seq in [s for s in self.pending if s not in self.stream.msgs]:
            del self.pending[seq]

    # -- acknowledgements, by stream sequence --------------------------------------
    def ack(self, seq: int) -> None:
        if self.pending.pop(seq, None) is not None and self.stream.config.retention == "workqueue":
            self.stream.remove(seq)

    def term(self, seq: int) -> None:
        self.ack(seq)  # on a work queue term removes the message too (checked)

    def nak(self, seq: int, now: float, delay: float) -> None:
        pending = self.pending.get(seq)
        if pending is not None:
            pending.deadline = now + max(0.0, delay)

    def in_progress(self, seq: int, now: float) -> None:
        pending = self.pending.get(seq)
        if pending is not None:
            pending.deadline = now + self.config.ack_wait


@dataclass
class OrderedCursor:
    """An ordered consumer from the stream's beginning: nothing to ack, resumes after
    the last sequence it handed out (what nats-py's ordered consumer does on a reset)."""

    stream: Stream
    filters: tuple[str, ...]
    next_seq: int = 1

    def next(self, now: float) -> tuple[StoredMsg, int] | None:
        self.stream.expire(now)
        msg = self.stream.next_matching(self.next_seq, self.filters)
        if msg is None:
            return None
        self.next_seq = msg.seq + 1
        return msg, self.stream.pending_after(msg.seq, self.filters)


@dataclass(frozen=True, slots=True)
class Entry:
    bucket: str
    key: str
    value: bytes
    revision: int
    created: float


class Bucket:
    """A KV bucket as nats-server builds it: a stream ``KV_<bucket>`` on ``$KV.<bucket>.>``.
    The revision is the stream sequence (shared by all keys); the TTL is the stream's
    max_age (a key expires ``ttl`` after its last write); a delete leaves a marker."""

    def __init__(self, name: str, ttl: float = 0.0, history: int = 1) -> None:
        self.name = name
        self.stream = Stream(
            StreamConfig(
                name=f"KV_{name}", subjects=(f"$KV.{name}.>",), max_msgs_per_subject=history, max_age=ttl
            )
        )

    def _subject(self, key: str) -> str:
        return f"$KV.{self.name}.{key}"

    def get(self, key: str, now: float) -> Entry:
        self.stream.expire(now)
        msg = self.stream.last_for_subject(self._subject(key))
        if msg is None or msg.header(KV_OPERATION) is not None:
            raise KeyNotFound(f"key {key!r} not found in bucket {self.name}")
        return Entry(self.name, key, msg.data, msg.seq, msg.time)

    def put(self, key: str, value: bytes, now: float) -> int:
        return self.stream.store(self._subject(key), value, {}, now).seq

    def update(self, key: str, value: bytes, last: int, now: float) -> int:
        """Compare-and-set: only if the key's latest revision is ``last`` (0: no message at all)."""
        self.stream.expire(now)
        return self.stream.store(self._subject(key), value, {}, now, expected_last_subject_seq=last).seq

    def create(self, key: str, value: bytes, now: float) -> int:
        """Only if the key has no value: never written, expired, or deleted (over its marker)."""
        self.stream.expire(now)
        last = self.stream.last_for_subject(self._subject(key))
        expected = last.seq if last is not None and last.header(KV_OPERATION) is not None else 0
        return self.update(key, value, expected, now)

    def delete(self, key: str, now: float, last: int | None = None) -> int:
        self.stream.expire(now)
        return self.stream.store(
            self._subject(key), b"", {KV_OPERATION: "DEL"}, now, expected_last_subject_seq=last
        ).seq

    def purge(self, key: str, now: float) -> int:
        seq = self.stream.store(self._subject(key), b"", {KV_OPERATION: "PURGE"}, now).seq
        self.stream.purge_subject(self._subject(key), seq)
        return seq
