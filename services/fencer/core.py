"""The fencer's decisions as a sans-I/O core: ``FencerCore.handle(event, now) -> [effects]``.

A fence request (a work-queue delivery) goes through these steps, each one a
``Call`` whose ``Returned`` starts the next (S3 and S4 under concurrency):

1. the subject must name the request's host (else it is dead-lettered), and the
   host must be configured (else a ``failed`` result: the arbiter escalates);
2. one request per host at a time: later ones wait, their deliveries kept in
   progress every ``ack_wait / 3`` (so JetStream does not hand them to another
   handler meanwhile); deliveries that arrive before the journal is loaded wait too;
3. across replicas: ``replicas.admit`` (refuse, answer from a record another
   replica wrote, or run), then ``replicas.claim`` (wait for the claim, or for the
   result another replica recorded meanwhile);
4. this replica's journal, held in memory and loaded once at ``Started``:
   ``admission.admit_request`` against the highest term and the request's entry
   (S3 before S4), applied to memory at once (so a request of another host decided
   later sees the raised term), then written (``journal.admit``) before the next step;
5. ``power.fence``; the result is written (``journal.record``, then
   ``replicas.record``) before it is published; the delivery is acked once the
   result is stored on the bus. A refusal carries the highest term and raises the
   ``fence_refused`` alert.

A failed step publishes nothing and asks for a redelivery: the redelivered request
is decided again (the journal counts the attempt; a recorded result answers it).

Every ``health_interval_s`` it checks each host's devices (``power.check``, one
host after the other) and announces a change of protection (``protected`` /
``not_protected``). Wall-clock stamps come from ``now.wall``; the core reads no
clock, no file and no device.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hafence import metrics
from hafence.bus.consume import MAX_HANDLER_ATTEMPTS
from hafence.bus.names import StreamNames
from hafence.config import ClusterConfig
from hafence.contracts import Alert, Decoders, FenceRequest, FenceResult, HostEvent
from hafence.core import (
    Ack,
    CancelTimer,
    Consume,
    Delivered,
    Effect,
    Event,
    InProgress,
    Inputs,
    Log,
    Nak,
    Now,
    Publish,
    Returned,
    SetTimer,
    Span,
    Started,
    Term,
    TimerFired,
)
from hafence.core.effects import Call
from hafence.fencer import admission
from hafence.fencer.admission import Answer, Refuse, Run, Seen, Verdict
from hafence.fencer.ports import Claimed, FenceReport, JournalState, Protection
from hafence.subjects import Subjects

REQUESTS = "requests"  # the consumer's input name
HEALTH_TIMER = "health"
LOAD_TIMER = "load"
LOAD_RETRY_S = 1.0


@dataclass
class Job:
    """One delivery of a fence request, from its arrival to its settlement."""

    jid: int
    request: FenceRequest
    token: int
    attempt: int
    started: float
    shared_highest: int = 0
    highest: int = 0
    attempts: int = 0
    claimed: bool = False
    refused: bool = False
    verdict: Verdict | None = None  # this replica's journal's
    result: FenceResult | None = None
    headers: dict[str, str] = field(default_factory=dict)  # the request's trace context


class FencerCore:
    name = "fencer"

    def __init__(self, config: ClusterConfig) -> None:
        prefix = config.cluster.subject_prefix
        self.subjects = Subjects(prefix)
        self.streams = StreamNames.for_prefix(prefix)
        self.hosts = [h.name for h in config.hosts]
        self.ack_wait = config.timings.fence_ack_wait_s
        self.health_interval = config.fencer.health_interval_s
        # The journal, in memory: loaded once, then kept in step with every write.
        self.loaded = False
        self.highest = 0
        self.seen: dict[str, Seen] = {}
        self.jobs: dict[int, Job] = {}
        self._next_jid = 0
        self.busy: dict[str, int] = {}  # host -> the job running for it
        self.waiting: dict[str, deque[int]] = {}  # host -> jobs waiting behind it
        self.before_load: list[int] = []
        self.protected: dict[str, bool] = {}
        self._health_next = 0

    def inputs(self) -> Inputs:
        return Inputs(consumers=[Consume(
            name=REQUESTS, stream=self.streams.fence_requests, durable="fencer",
            filters=[self.subjects.fence_requests()], accepts=Decoders.fence_request,
            ack_wait=self.ack_wait, concurrency=16,
        )])

    # -- events -------------------------------------------------------------------
    def handle(self, event: Event, now: Now) -> list[Effect]:
        match event:
            case Started():
                return [Call("journal", "load", (), "load"), *self._check_next(restart=True)]
            case Delivered(source=source) if source == REQUESTS:
                return self._delivered(event, now)
            case Returned(tag=tag):
                return self._returned(tag, event, now)
            case TimerFired(key=key):
                return self._timer(key)
        return []

    def _timer(self, key: str) -> list[Effect]:
        if key == HEALTH_TIMER:
            return self._check_next(restart=True)
        if key == LOAD_TIMER:
            return [Call("journal", "load", (), "load")]
        if key.startswith("progress:"):
            job = self.jobs.get(int(key.removeprefix("progress:")))
            if job is None:
                return []
            return [InProgress(job.token), SetTimer(key, self.ack_wait / 3)]
        return []

    def _returned(self, tag: str, event: Returned, now: Now) -> list[Effect]:
        if tag == "load":
            return self._loaded(event)
        step, _, ref = tag.partition(":")
        if step == "check":
            return self._checked(ref, event, now)
        job = self.jobs.get(int(ref)) if ref.isdigit() else None
        if job is None:
            return []
        if step == "publish":
            return self._published(job, event)
        if not event.ok:
            delay = self.ack_wait if step == "power" else self._retry_delay(job)
            return self._fail(job, f"{step} failed: {event.error}", delay)
        match step:
            case "shared_admit":
                return self._shared_verdict(job, event.value, now)
            case "claim":
                return self._claimed(job, event.value, now)
            case "journal_admit":
                return self._journal_admitted(job, now)
            case "raise_term":
                return self._refuse(job, self._local_refusal(job), job.highest, now)
            case "share_answer":
                assert job.result is not None
                return self._answer(job, job.result, "journal")
            case "power":
                return self._fenced(job, event.value, now)
            case "journal_record":
                return self._journal_recorded(job)
            case "shared_record":
                assert job.result is not None
                return self._finish(job, job.result, f"result:{job.request.request_id}")
        return []

    # -- requests -----------------------------------------------------------------
    def _delivered(self, event: Delivered, now: Now) -> list[Effect]:
        request = event.message
        if not isinstance(request, FenceRequest):
            return [Term(event.token, f"not a fence request: {type(request).__name__}")]
        if event.subject != self.subjects.fence_request(request.host):
            return [Term(event.token, f"request for host {request.host!r} on subject {event.subject}")]
        self._next_jid += 1
        job = Job(self._next_jid, request, event.token, event.attempt, now.wall, headers=dict(event.headers))
        self.jobs[job.jid] = job
        if request.host not in self.hosts:
            # Not a matter of terms: this fencer cannot fence the host. A failure, so the
            # arbiter retries and escalates, instead of re-issuing into the same wall.
            reason = f"host {request.host!r} is not in the fencer's configuration"
            job.result = FenceResult(
                request_id=request.request_id, incident=request.incident, host=request.host, term=request.term,
                outcome="failed", reason=reason, started_at=now.wall, finished_at=now.wall, boot_id=request.boot_id,
            )
            return [Log("error", "cannot fence", {"request_id": request.request_id, "reason": reason}),
                    self._publish(job, job.result, f"result:{request.request_id}")]
        # In progress while waiting too: a request that waits behind another must not be
        # redelivered to a second handler.
        effects: list[Effect] = [SetTimer(self._progress_key(job), self.ack_wait / 3)]
        if not self.loaded:
            self.before_load.append(job.jid)
            return effects
        return effects + self._enqueue(job, waited=False)

    def _enqueue(self, job: Job, waited: bool = True) -> list[Effect]:
        host = job.request.host
        if host in self.busy:
            self.waiting.setdefault(host, deque()).append(job.jid)
            return []
        self.busy[host] = job.jid
        effects: list[Effect] = []
        if waited:
            # Started by another event (the host freed, the journal loaded): its calls
            # join the request's own trace, not that event's.
            effects.append(Span(f"fencer resume fence.request {host}", job.headers,
                                {"hafence.host": host, "hafence.request_id": job.request.request_id}))
        effects.append(Call("replicas", "admit", (job.request,), self._tag("shared_admit", job)))
        return effects

    def _next_for(self, host: str) -> list[Effect]:
        """The host is free: start the next job waiting for it."""
        self.busy.pop(host, None)
        queue = self.waiting.get(host)
        while queue:
            job = self.jobs.get(queue.popleft())
            if job is not None:
                return self._enqueue(job)
        self.waiting.pop(host, None)
        return []

    def _shared_verdict(self, job: Job, verdict: Verdict, now: Now) -> list[Effect]:
        match verdict:
            case Refuse(reason=reason, highest=highest):
                return self._refuse(job, reason, highest, now)
            case Answer(result=recorded):
                return self._answer(job, recorded, "record another replica wrote")
            case Run(highest=highest):
                job.shared_highest = highest
                return [Call("replicas", "claim", (job.request, highest), self._tag("claim", job))]
        return self._fail(job, f"replicas.admit answered {verdict!r}", self._retry_delay(job))

    def _claimed(self, job: Job, claim: Claimed | Answer, now: Now) -> list[Effect]:
        if isinstance(claim, Answer):
            return self._answer(job, claim.result, "record another replica wrote")
        job.claimed = True
        request = job.request
        verdict = admission.admit_request(request.request_id, request.incident, request.host, request.term,
                                          self.highest, self.seen.get(request.request_id))
        # Applied before it is written: a request decided next (another host's) must see
        # the raised term; a term raised in memory and lost in a crash refused only
        # requests, and the request that raised it never reached a device.
        if not isinstance(verdict, Refuse):
            self.highest = max(self.highest, verdict.highest)
        if isinstance(verdict, Run):
            self.seen[request.request_id] = Seen(request.incident, request.host, verdict.attempts, None)
        job.verdict = verdict
        return [Call("journal", "admit", (request, verdict, now.wall), self._tag("journal_admit", job))]

    def _journal_admitted(self, job: Job, now: Now) -> list[Effect]:
        match job.verdict:
            case Refuse(highest=highest):
                # This replica's journal knew a newer term than the shared state: every
                # replica learns it before the refusal goes out.
                job.highest = highest
                return [Call("replicas", "raise_term", (highest,), self._tag("raise_term", job))]
            case Answer(result=recorded):
                job.result = recorded
                return [Call("replicas", "record", (job.request, recorded), self._tag("share_answer", job))]
            case Run(attempts=attempts, highest=local_highest):
                job.highest = max(local_highest, job.shared_highest)
                job.attempts = attempts
                effects: list[Effect] = []
                if attempts > 1:
                    effects.append(Log("warning", "resuming a fence interrupted before it was recorded; "
                                                  "reading power state again",
                                       {"request_id": job.request.request_id, "attempts": attempts}))
                effects.append(Call("power", "fence", (job.request,), self._tag("power", job)))
                return effects
        return []

    def _local_refusal(self, job: Job) -> str:
        return job.verdict.reason if isinstance(job.verdict, Refuse) else ""

    def _fenced(self, job: Job, report: FenceReport, now: Now) -> list[Effect]:
        request = job.request
        job.result = FenceResult(
            request_id=request.request_id, incident=request.incident, host=request.host, term=request.term,
            outcome=report.verdict.outcome, level=report.verdict.level, evidence=list(report.evidence),
            reason=report.verdict.reason, started_at=job.started, finished_at=now.wall, boot_id=request.boot_id,
            highest_term=job.highest,
        )
        return [Call("journal", "record", (request, job.result), self._tag("journal_record", job))]

    def _journal_recorded(self, job: Job) -> list[Effect]:
        request, result = job.request, job.result
        assert result is not None
        # Only now: a result in memory answers a redelivery, so it must be on disk first.
        self.seen[request.request_id] = Seen(request.incident, request.host, job.attempts, result)
        metrics.FENCES.labels(request.host, result.outcome).inc()
        metrics.FENCE_SECONDS.labels(result.outcome).observe(result.finished_at - result.started_at)
        return [
            Log("warning", "fence finished", {"host": request.host, "outcome": result.outcome,
                                              "reason": result.reason}),
            Call("replicas", "record", (request, result), self._tag("shared_record", job)),
        ]

    def _refuse(self, job: Job, reason: str, highest: int, now: Now) -> list[Effect]:
        request = job.request
        job.refused = True
        result = FenceResult(
            request_id=request.request_id, incident=request.incident, host=request.host,
            term=request.term, outcome="refused", reason=reason, started_at=job.started,
            finished_at=now.wall, highest_term=highest, boot_id=request.boot_id,
        )
        return [Log("error", "refusing fence request", {"request_id": request.request_id, "reason": reason}),
                *self._finish(job, result, f"refused:{request.request_id}:t{request.term}")]

    def _answer(self, job: Job, recorded: FenceResult, where: str) -> list[Effect]:
        return [Log("info", f"request seen before: answering from the {where}",
                    {"request_id": job.request.request_id, "outcome": recorded.outcome}),
                *self._finish(job, recorded, f"result:{job.request.request_id}")]

    def _finish(self, job: Job, result: FenceResult, msg_id: str) -> list[Effect]:
        """The decision is made and stored: free the claim and the host, publish."""
        job.result = result
        effects = self._release(job)
        effects.append(self._publish(job, result, msg_id))
        return effects + self._next_for(job.request.host)

    def _publish(self, job: Job, result: FenceResult, msg_id: str) -> Publish:
        return Publish(self.subjects.fence_result(job.request.host), result, msg_id=msg_id,
                       tag=self._tag("publish", job))

    def _published(self, job: Job, event: Returned) -> list[Effect]:
        """The result is on the bus (or not): settle the delivery."""
        self.jobs.pop(job.jid, None)
        effects: list[Effect] = [CancelTimer(self._progress_key(job))]
        if not event.ok:
            # Nothing was lost: the redelivery is answered from the journal.
            effects.append(Log("error", "cannot publish the fence result",
                               {"request_id": job.request.request_id, "error": event.error}))
            effects.append(self._settle_failed(job, f"publishing the result failed: {event.error}",
                                               self._retry_delay(job)))
            return effects
        if job.refused and job.result is not None:
            # Best effort: the result is what the arbiter acts on.
            request = job.request
            effects.append(Publish(
                self.subjects.alert("fence_refused"),
                Alert(kind="fence_refused", at=job.result.finished_at, service="fencer", reason=job.result.reason,
                      host=request.host, term=request.term),
                msg_id=f"fence_refused:{request.request_id}:t{request.term}",
            ))
        effects.append(Ack(job.token))
        return effects

    def _fail(self, job: Job, reason: str, delay: float) -> list[Effect]:
        """Publish nothing; the redelivery decides again (a claim lost, a store that failed)."""
        self.jobs.pop(job.jid, None)
        effects: list[Effect] = [Log("error", "fence request not done; it will be redelivered",
                                     {"request_id": job.request.request_id, "reason": reason})]
        effects += self._release(job)
        effects += [CancelTimer(self._progress_key(job)), self._settle_failed(job, reason, delay)]
        if self.busy.get(job.request.host) == job.jid:
            effects += self._next_for(job.request.host)
        return effects

    def _settle_failed(self, job: Job, reason: str, delay: float) -> Effect:
        if job.attempt >= MAX_HANDLER_ATTEMPTS:
            return Term(job.token, f"handler failed {job.attempt} times: {reason}")
        return Nak(job.token, delay)

    def _release(self, job: Job) -> list[Effect]:
        if not job.claimed:
            return []
        job.claimed = False
        return [Call("replicas", "release", (job.request.request_id,))]

    def _retry_delay(self, job: Job) -> float:
        return min(30.0, 0.5 * job.attempt)

    @staticmethod
    def _tag(step: str, job: Job) -> str:
        return f"{step}:{job.jid}"

    @staticmethod
    def _progress_key(job: Job) -> str:
        return f"progress:{job.jid}"

    # -- the journal ----------------------------------------------------------------
    def _loaded(self, event: Returned) -> list[Effect]:
        if not event.ok:
            return [Log("error", "cannot load the fence journal; trying again", {"error": event.error}),
                    SetTimer(LOAD_TIMER, LOAD_RETRY_S)]
        state: JournalState = event.value
        self.highest = max(self.highest, state.highest_term)
        self.seen = dict(state.requests)
        self.loaded = True
        effects: list[Effect] = []
        for jid in self.before_load:
            job = self.jobs.get(jid)
            if job is not None:
                effects += self._enqueue(job)
        self.before_load.clear()
        return effects

    # -- health -------------------------------------------------------------------
    def _check_next(self, restart: bool = False) -> list[Effect]:
        if restart:
            self._health_next = 0
        if self._health_next >= len(self.hosts):
            return [SetTimer(HEALTH_TIMER, self.health_interval)]
        host = self.hosts[self._health_next]
        self._health_next += 1
        return [Call("power", "check", (host,), f"check:{host}")]

    def _checked(self, host: str, event: Returned, now: Now) -> list[Effect]:
        effects: list[Effect] = []
        if not event.ok:
            effects.append(Log("error", "cannot check protection", {"host": host, "error": event.error}))
        else:
            verdict: Protection = event.value
            metrics.PROTECTED.labels(host).set(1 if verdict.protected else 0)
            if self.protected.get(host) != verdict.protected:
                self.protected[host] = verdict.protected
                kind = "protected" if verdict.protected else "not_protected"
                effects += [
                    Log("info" if verdict.protected else "error", "host protection",
                        {"host": host, "protected": verdict.protected, "reason": verdict.reason}),
                    Publish(self.subjects.host_event(host, kind),
                            HostEvent(host=host, kind=kind, at=now.wall, reason=verdict.reason)),
                ]
        return effects + self._check_next()
