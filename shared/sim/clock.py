"""Virtual time for the simulation: one scheduler, tasks on it, and a clock per node.

The ``Scheduler`` holds every timer in one heap keyed by (time, insertion number):
``run`` takes the earliest, sets ``now`` to its time and runs it. Everything due
now runs before time moves; when nothing is due, time jumps to the next timer.
Ties are broken by insertion order, so a run depends only on what was scheduled,
never on hashing, identity or real time. Nothing in this module reads a real clock.

``Task`` runs a coroutine on the scheduler the way asyncio would, but it may
only await ``SimFuture``s (a sleep, a reply, a fetch): awaiting an asyncio object
inside a simulated task is an error, because asyncio would bring real time back.
Cancellation uses ``asyncio.CancelledError`` (only the exception class: code that
already handles cancellation keeps working).

``NodeClock`` is one node's view of time: a monotonic clock and a wall clock,
both running at ``1 + drift`` times simulated time, with an offset each; the wall
clock can also be stepped (``jump``), the monotonic one never goes back.
"""

from __future__ import annotations

import heapq
import itertools
from asyncio import CancelledError
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_PENDING, _DONE, _CANCELLED = "pending", "done", "cancelled"


class Timer:
    """A scheduled callback; ``cancel`` before it runs and it never will."""

    __slots__ = ("args", "callback", "cancelled", "seq", "when")

    def __init__(self, when: float, seq: int, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.when = when
        self.seq = seq
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class Scheduler:
    """Simulated time and the callbacks due in it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        # (time, insertion number, timer): tuples compare in C, a Timer.__lt__ per comparison cost a third of a run.
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.steps = 0
        # Tasks that failed with nobody awaiting them: a simulation should look here.
        self.unhandled: list[tuple[str, BaseException]] = []

    # -- timers ----------------------------------------------------------------
    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Timer:
        # A time in the past means "as soon as possible": time never goes back.
        timer = Timer(max(when, self.now), next(self._seq), callback, args)
        heapq.heappush(self._heap, (timer.when, timer.seq, timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(self.now + max(0.0, delay), callback, *args)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Timer:
        return self.call_at(self.now, callback, *args)

    def next_time(self) -> float | None:
        """When the next live timer is due (None: nothing scheduled)."""
        heap = self._heap
        while heap and heap[0][2].cancelled:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def step(self) -> bool:
        """Run the next due callback, moving time to it; False when nothing is scheduled."""
        when = self.next_time()
        if when is None:
            return False
        timer = heapq.heappop(self._heap)[2]
        self.now = when
        self.steps += 1
        timer.callback(*timer.args)
        return True

    def run(
        self, until: float | None = None, max_steps: int | None = None,
        after_step: Callable[[], object] | None = None,
    ) -> None:
        """Run callbacks in time order until ``until`` (then time is ``until``), until
        nothing is scheduled, or for ``max_steps`` callbacks; ``after_step`` after each
        (the simulation's checkers). One tight loop: it is the simulation's hot path."""
        heap, pop = self._heap, heapq.heappop
        steps = 0
        while max_steps is None or steps < max_steps:
            while heap and heap[0][2].cancelled:
                pop(heap)
            if not heap:
                break
            when = heap[0][0]
            if until is not None and when > until:
                break
            timer = pop(heap)[2]
            self.now = when
            self.steps += 1
            timer.callback(*timer.args)
            if after_step is not None:
                after_step()
            steps += 1
        if until is not None and self.now < until and (max_steps is None or steps < max_steps):
            self.now = until

    def run_until_complete(self, future: SimFuture[T], limit: float | None = None) -> T:
        """Run until ``future`` is done and return its result; a deadlock (nothing
        scheduled, future pending) or passing ``limit`` is an error naming the future."""
        while not future.done():
            when = self.next_time()
            if when is None:
                raise RuntimeError(f"simulation idle at t={self.now:.6f} but {future!r} is still pending")
            if limit is not None and when > limit:
                raise RuntimeError(f"{future!r} still pending at the time limit t={limit:.6f}")
            self.step()
        return future.result()

    # -- futures and tasks -------------------------------------------------------
    def future(self, name: str = "") -> SimFuture[Any]:
        return SimFuture(self, name)

    def sleep(self, delay: float, result: T | None = None) -> SimFuture[T | None]:
        """A future done ``delay`` simulated seconds from now."""
        fut: SimFuture[T | None] = SimFuture(self, f"sleep({delay:g})")
        timer = self.call_later(delay, fut._set_if_pending, result)
        fut.add_done_callback(lambda f: timer.cancel() if f.cancelled() else None)
        return fut

    def spawn(self, coro: Coroutine[Any, Any, T], name: str = "") -> Task[T]:
        return Task(self, coro, name or getattr(coro, "__qualname__", "task"))

    def wait_for(self, awaitable: SimFuture[T], timeout: float) -> SimFuture[T]:
        """``awaitable``'s outcome, or TimeoutError after ``timeout`` (``awaitable`` is then cancelled)."""
        out: SimFuture[T] = SimFuture(self, f"wait_for({awaitable.name})")

        def expire() -> None:
            if not out.done():
                awaitable.cancel()
                out.set_exception(TimeoutError(f"{awaitable.name or 'operation'} timed out after {timeout:g}s"))

        timer = self.call_later(timeout, expire)

        def finished(f: SimFuture[T]) -> None:
            timer.cancel()
            if out.done():
                return
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                out.set_result(f.result())

        awaitable.add_done_callback(finished)
        return out


class SimFuture(Generic[T]):
    """A result that arrives later in simulated time. Callbacks run through the
    scheduler (never inline), so the order of everything stays in its one queue."""

    def __init__(self, scheduler: Scheduler, name: str = "") -> None:
        self._scheduler = scheduler
        self.name = name
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[SimFuture[T]], object]] = []

    def __repr__(self) -> str:
        return f"<SimFuture {self.name or '?'} {self._state}>"

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def result(self) -> T:
        if self._state == _CANCELLED:
            raise CancelledError(self.name)
        if self._state == _PENDING:
            raise RuntimeError(f"{self!r}: result asked before it is done")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[no-any-return]

    def exception(self) -> BaseException | None:
        if self._state == _CANCELLED:
            raise CancelledError(self.name)
        return self._exception

    def add_done_callback(self, callback: Callable[[SimFuture[T]], object]) -> None:
        if self.done():
            self._scheduler.call_soon(callback, self)
        else:
            self._callbacks.append(callback)

    def set_result(self, value: T) -> None:
        if self.done():
            raise RuntimeError(f"{self!r}: result set twice")
        self._result = value
        self._finish(_DONE)

    def set_exception(self, exception: BaseException) -> None:
        if self.done():
            raise RuntimeError(f"{self!r}: exception set twice")
        self._exception = exception
        self._finish(_DONE)

    def _set_if_pending(self, value: T) -> None:
        if not self.done():
            self.set_result(value)

    def cancel(self) -> bool:
        if self.done():
            return False
        self._finish(_CANCELLED)
        return True

    def _finish(self, state: str) -> None:
        self._state = state
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._scheduler.call_soon(callback, self)

    def __await__(self) -> Generator[SimFuture[T], None, T]:
        if not self.done():
            yield self
        return self.result()


class Task(SimFuture[T]):
    """A coroutine stepped by the scheduler; it may await only SimFutures."""

    def __init__(self, scheduler: Scheduler, coro: Coroutine[Any, Any, T], name: str) -> None:
        super().__init__(scheduler, name)
        self._coro = coro
        self._waiting: SimFuture[Any] | None = None
        self._must_cancel = False
        scheduler.call_soon(self._step, None, None)

    def cancel(self) -> bool:
        if self.done():
            return False
        if self._waiting is not None and self._waiting.cancel():
            return True  # the awaited future's callback throws CancelledError into the coroutine
        self._must_cancel = True
        return True

    def _step(self, value: Any, error: BaseException | None) -> None:
        if self.done():
            return
        if self._must_cancel:
            self._must_cancel = False
            error = CancelledError(self.name)
        try:
            yielded = self._coro.throw(error) if error is not None else self._coro.send(value)
        except StopIteration as stop:
            self.set_result(stop.value)
            return
        except CancelledError:
            super().cancel()
            return
        except BaseException as exc:  # the task's outcome: kept for whoever awaits it
            if not self._callbacks:
                self._scheduler.unhandled.append((self.name, exc))
            self.set_exception(exc)
            return
        if isinstance(yielded, SimFuture):
            self._waiting = yielded
            yielded.add_done_callback(self._wakeup)
        else:
            problem = RuntimeError(
                f"task {self.name!r} awaited {yielded!r}, which is not a SimFuture "
                "(asyncio objects would bring real time into the simulation)"
            )
            self._scheduler.call_soon(self._step, None, problem)

    def _wakeup(self, future: SimFuture[Any]) -> None:
        self._waiting = None
        try:
            value = future.result()
        except BaseException as exc:
            self._step(None, exc)
        else:
            self._step(value, None)


class NodeClock:
    """One node's clocks. Local time runs at ``1 + drift`` times simulated time;
    ``monotonic()`` and ``wall()`` are local time plus their offsets."""

    def __init__(
        self,
        scheduler: Scheduler,
        node: str,
        monotonic_offset: float = 0.0,
        wall_epoch: float = 1_700_000_000.0,
        drift: float = 0.0,
    ) -> None:
        if drift <= -1.0:
            raise ValueError(f"clock of {node}: drift {drift} would stop or reverse time")
        self.scheduler = scheduler
        self.node = node
        self.monotonic_offset = monotonic_offset
        self.wall_offset = wall_epoch
        # Local elapsed time = _local_anchor + (now - _sim_anchor) * _rate.
        self._sim_anchor = scheduler.now
        self._local_anchor = 0.0
        self._rate = 1.0 + drift

    @property
    def drift(self) -> float:
        return self._rate - 1.0

    def _elapsed(self) -> float:
        return self._local_anchor + (self.scheduler.now - self._sim_anchor) * self._rate

    def monotonic(self) -> float:
        return self.monotonic_offset + self._elapsed()

    def wall(self) -> float:
        return self.wall_offset + self._elapsed()

    def set_drift(self, drift: float) -> None:
        """Change the rate from now on (a thermal change, an NTP slew)."""
        if drift <= -1.0:
            raise ValueError(f"clock of {self.node}: drift {drift} would stop or reverse time")
        self._local_anchor = self._elapsed()
        self._sim_anchor = self.scheduler.now
        self._rate = 1.0 + drift

    def jump(self, seconds: float) -> None:
        """Step the wall clock (an operator, a bad NTP server); monotonic time is unaffected."""
        self.wall_offset += seconds

    def to_sim(self, local_seconds: float) -> float:
        """Simulated seconds that pass while this node's clock counts ``local_seconds``."""
        return max(0.0, local_seconds) / self._rate

    def sleep(self, seconds: float) -> SimFuture[None]:
        """Sleep ``seconds`` of this node's time (a drift change during the sleep is not applied)."""
        return self.scheduler.sleep(self.to_sim(seconds))

    def call_later(self, seconds: float, callback: Callable[..., object], *args: Any) -> Timer:
        return self.scheduler.call_later(self.to_sim(seconds), callback, *args)
