"""The simulation's virtual clock: time order, ties, jumps to the next timer, tasks, node clocks."""

from __future__ import annotations

from asyncio import CancelledError

import pytest

from hafence.sim.clock import NodeClock, Scheduler, SimFuture


def test_callbacks_run_in_time_order_and_ties_in_insertion_order() -> None:
    s = Scheduler()
    seen: list[str] = []
    s.call_at(2.0, seen.append, "b1")
    s.call_at(1.0, seen.append, "a")
    s.call_at(2.0, seen.append, "b2")
    s.call_soon(seen.append, "now")
    s.call_at(2.0, seen.append, "b3")
    s.run()
    assert seen == ["now", "a", "b1", "b2", "b3"]
    assert s.now == 2.0


def test_time_jumps_to_the_next_timer_when_nothing_is_runnable() -> None:
    s = Scheduler()
    times: list[float] = []
    s.call_at(3600.0, lambda: times.append(s.now))
    s.run()
    assert times == [3600.0]
    assert s.steps == 1  # one callback, no polling in between


def test_run_until_stops_at_the_limit_and_leaves_later_timers() -> None:
    s = Scheduler()
    seen: list[float] = []
    for t in (1.0, 2.0, 3.0):
        s.call_at(t, seen.append, t)
    s.run(until=2.5)
    assert seen == [1.0, 2.0] and s.now == 2.5
    s.run()
    assert seen == [1.0, 2.0, 3.0]


def test_a_cancelled_timer_never_runs() -> None:
    s = Scheduler()
    seen: list[int] = []
    timer = s.call_later(1.0, seen.append, 1)
    timer.cancel()
    s.run()
    assert seen == []


def test_a_time_in_the_past_runs_now_not_before() -> None:
    s = Scheduler(start=10.0)
    seen: list[float] = []
    s.call_at(5.0, lambda: seen.append(s.now))
    s.run()
    assert seen == [10.0]


def test_tasks_sleep_in_simulated_time_and_return_values() -> None:
    s = Scheduler()

    async def worker(name: str, pause: float, log: list[tuple[str, float]]) -> str:
        await s.sleep(pause)
        log.append((name, s.now))
        await s.sleep(pause)
        log.append((name, s.now))
        return name.upper()

    log: list[tuple[str, float]] = []
    a = s.spawn(worker("a", 1.0, log))
    b = s.spawn(worker("b", 1.5, log))
    assert s.run_until_complete(b) == "B"
    assert a.result() == "A"
    assert log == [("a", 1.0), ("b", 1.5), ("a", 2.0), ("b", 3.0)]


def test_a_task_awaiting_a_task_gets_its_exception() -> None:
    s = Scheduler()

    async def fails() -> None:
        await s.sleep(1)
        raise ValueError("device unreachable")

    async def waits() -> str:
        try:
            await s.spawn(fails())
        except ValueError as err:
            return str(err)
        return "no error"

    assert s.run_until_complete(s.spawn(waits())) == "device unreachable"
    assert s.unhandled == []


def test_an_unawaited_failing_task_is_recorded() -> None:
    s = Scheduler()

    async def fails() -> None:
        raise RuntimeError("bug in a core")

    s.spawn(fails(), name="core")
    s.run()
    assert [(name, str(err)) for name, err in s.unhandled] == [("core", "bug in a core")]


def test_cancel_throws_into_the_awaited_sleep_and_the_timer_is_dropped() -> None:
    s = Scheduler()
    cleaned: list[float] = []

    async def sleeper() -> None:
        try:
            await s.sleep(100.0)
        finally:
            cleaned.append(s.now)

    task = s.spawn(sleeper())
    s.call_at(5.0, task.cancel)
    s.run()
    assert task.cancelled()
    assert cleaned == [5.0]
    assert s.now == 5.0  # the 100 s sleep timer was cancelled, time did not run on to it


def test_wait_for_times_out_in_simulated_time() -> None:
    s = Scheduler()
    never: SimFuture[int] = s.future("never")
    out = s.wait_for(never, 2.0)
    with pytest.raises(TimeoutError):
        s.run_until_complete(out)
    assert s.now == 2.0 and never.cancelled()


def test_awaiting_an_asyncio_object_in_a_simulated_task_is_an_error() -> None:
    import asyncio

    s = Scheduler()

    async def bad() -> None:
        await asyncio.sleep(0)  # yields None to the runner, not a SimFuture

    task = s.spawn(bad())
    s.run()
    with pytest.raises(RuntimeError, match="not a SimFuture"):
        task.result()


def test_a_deadlock_names_the_pending_future() -> None:
    s = Scheduler()
    with pytest.raises(RuntimeError, match="still pending"):
        s.run_until_complete(s.future("reply from h1"))


def test_cancelled_future_raises_cancelled_error() -> None:
    s = Scheduler()
    f: SimFuture[int] = s.future()
    f.cancel()
    with pytest.raises(CancelledError):
        f.result()


def test_node_clocks_have_offsets_drift_and_wall_jumps() -> None:
    s = Scheduler()
    fast = NodeClock(s, "h1", monotonic_offset=100.0, wall_epoch=1_000.0, drift=0.01)
    exact = NodeClock(s, "h2")
    s.run(until=100.0)
    assert fast.monotonic() == pytest.approx(201.0)
    assert fast.wall() == pytest.approx(1_101.0)
    assert exact.monotonic() == pytest.approx(100.0)
    fast.jump(-50.0)  # NTP steps the wall clock back
    assert fast.wall() == pytest.approx(1_051.0)
    assert fast.monotonic() == pytest.approx(201.0)  # monotonic never goes back
    fast.set_drift(-0.5)
    s.run(until=110.0)
    assert fast.monotonic() == pytest.approx(206.0)


def test_a_node_sleeps_in_its_own_time() -> None:
    s = Scheduler()
    slow = NodeClock(s, "h1", drift=-0.5)  # counts half a second per simulated second

    async def nap() -> float:
        await slow.sleep(10.0)
        return s.now

    assert s.run_until_complete(s.spawn(nap())) == pytest.approx(20.0)


def test_a_clock_may_not_stop() -> None:
    with pytest.raises(ValueError, match="drift"):
        NodeClock(Scheduler(), "h1", drift=-1.0)
