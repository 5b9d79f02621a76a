"""The fencer core's production ports: power over the ``Executor`` and its drivers,
replicas over the KV buckets (``replicas.SharedRequests``, ``locks.KvLocks``).
The journal's production binding is ``journal.FenceJournal`` itself.

A claim on a request is held (renewed) by a task of its own from ``claim`` until
``release``; the fence of that request runs under it: if the claim cannot be
renewed in time, the fence is cancelled there and then and ``fence`` raises
``ClaimLost``, as it does when the fence ends past the claim's validity. The core
then publishes nothing and asks for a redelivery (another replica may own the
request by now).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from opentelemetry.context import Context

from hafence.config import ClusterConfig
from hafence.contracts import FenceRequest, FenceResult
from hafence.fencer.admission import Answer, Verdict
from hafence.fencer.drivers.watchdog import levels_for
from hafence.fencer.executor import Executor
from hafence.fencer.locks import KvLocks, LockLost, Token
from hafence.fencer.ports import Claimed, FenceReport, Protection
from hafence.fencer.replicas import SharedRequests
from hafence.logs import fields
from hafence.telemetry import tracer

log = logging.getLogger("hafence.fencer")


class ClaimLost(Exception):
    """The claim on a request ended before its fence did: stop, record nothing."""


class HeldClaim:
    """A request's claim, renewed by its own task until released or lost."""

    def __init__(self, locks: KvLocks, token: Token, tg: asyncio.TaskGroup) -> None:
        self.locks = locks
        self.token = token
        self.lost = ""
        self._done = asyncio.Event()
        self._runners: set[asyncio.Task[object]] = set()
        self._task = tg.create_task(self._hold(), name=f"hold {token.key}")

    async def _hold(self) -> None:
        try:
            async with self.locks.hold(self.token.key, self.token.what, self.token):
                await self._done.wait()
        except LockLost as err:
            self.lost = str(err)
            log.error("%s", err, extra=fields(claim=self.token.key))
            for runner in self._runners:
                runner.cancel()

    def expired(self) -> bool:
        return bool(self.lost) or self.locks.now() >= self.token.valid_until

    async def run(self, work: Coroutine[Any, Any, FenceReport]) -> FenceReport:
        """``work`` under the claim: cancelled if the claim is lost meanwhile."""
        task = asyncio.current_task()
        assert task is not None
        self._runners.add(task)  # type: ignore[arg-type]
        try:
            if self.lost:
                work.close()
                raise ClaimLost(self.lost)
            try:
                report = await work
            except asyncio.CancelledError:
                if not self.lost:
                    raise  # the service is stopping
                task.uncancel()
                raise ClaimLost(self.lost) from None
        finally:
            self._runners.discard(task)  # type: ignore[arg-type]
        if self.expired():
            # The claim's deadline is due but has not fired yet: a result taken past it
            # is never recorded (another replica may own the request now).
            raise ClaimLost(f"claim on {self.token.what} expired before its result was recorded")
        return report

    def release(self) -> None:
        self._done.set()


class KvReplicas:
    """The ``replicas`` port over the fencer's state and locks buckets."""

    def __init__(self, shared: SharedRequests, locks: KvLocks, tg: asyncio.TaskGroup) -> None:
        self.shared = shared
        self.locks = locks
        self.tg = tg
        self.claims: dict[str, HeldClaim] = {}

    async def admit(self, request: FenceRequest) -> Verdict:
        return await self.shared.admit(request)

    async def claim(self, request: FenceRequest, highest: int) -> Claimed | Answer:
        claim = await self.shared.acquire_claim(request, highest)
        if isinstance(claim, Answer):
            return claim
        old = self.claims.pop(request.request_id, None)
        if old is not None:
            old.release()
        self.claims[request.request_id] = HeldClaim(self.locks, claim, self.tg)
        return Claimed(claim.fence)

    async def raise_term(self, term: int) -> None:
        await self.shared.raise_term(term)

    async def record(self, request: FenceRequest, result: FenceResult) -> None:
        """Written under the claim: one lost meanwhile (a pause) stops here, and the
        core publishes nothing (the replica that took the request over answers)."""
        claim = self.claims.get(request.request_id)
        if claim is not None and claim.expired():
            raise ClaimLost(claim.lost or f"claim on {claim.token.what} expired before its result was shared")
        await self.shared.record(request, result)

    def release(self, request_id: str) -> None:
        claim = self.claims.pop(request_id, None)
        if claim is not None:
            claim.release()

    def held(self, request_id: str) -> HeldClaim | None:
        return self.claims.get(request_id)


class ExecutorPower:
    """The ``power`` port over the ``Executor``: the host's topology for a request
    (its watchdog levels only for ``method = "watchdog"``), run under the request's
    claim when there are replicas."""

    def __init__(self, config: ClusterConfig, executor: Executor, replicas: KvReplicas | None = None) -> None:
        self.config = config
        self.hosts = {h.name: h for h in config.hosts}
        self.executor = executor
        self.replicas = replicas

    async def fence(self, request: FenceRequest) -> FenceReport:
        claim = self.replicas.held(request.request_id) if self.replicas is not None else None
        with tracer().start_as_current_span(
            f"fence {request.host}",
            attributes={"hafence.host": request.host, "hafence.action": request.action,
                        "hafence.request_id": request.request_id,
                        "hafence.claim_token": claim.token.fence if claim is not None else 0},
        ) as span:
            work = self.executor.fence(levels_for(self.config, self.hosts[request.host], request.method),
                                       request.action)
            report = await (claim.run(work) if claim is not None else work)
            span.set_attribute("hafence.outcome", report.verdict.outcome)
        return report

    async def check(self, host: str) -> Protection:
        with tracer().start_as_current_span(f"check protection {host}", context=Context()):
            return await self.executor.check_host(self.hosts[host])
