"""One seed, one run: the whole simulated cluster replays byte for byte, reads no real clock,
and ``python -m hafence.sim`` reports a violation with its seed, rule and log."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hafence.sim import run as sim_run
from hafence.sim.__main__ import main
from hafence.sim.run import run_seed

MINUTES = 2.0


def cli(seed: int, hashseed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    out = subprocess.run(
        [sys.executable, "-m", "hafence.sim", "--seed", str(seed), "--minutes", str(MINUTES), "--print-log"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode in (0, 1), out.stderr
    return out.stdout


def test_the_same_seed_gives_the_same_log_byte_for_byte() -> None:
    a, b = run_seed(7, MINUTES), run_seed(7, MINUTES)
    assert a.log.count("\n") > 1000  # a whole cluster ran: services, faults, fences
    assert a.log == b.log and a.summary() == b.summary()
    assert run_seed(8, MINUTES).log != a.log


def test_the_run_does_not_depend_on_the_process_or_its_hash_seed() -> None:
    """Sets and dicts of strings iterate in hash order, which PYTHONHASHSEED changes: a run
    that depended on it would differ between these processes."""
    first, second = cli(5, "1"), cli(5, "2")
    assert first == second
    assert run_seed(5, MINUTES).log in first


def test_no_real_time_is_read_during_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    run_seed(3, 0.5)  # imports and first-use caches outside the check

    def forbidden(*_: object) -> float:
        raise AssertionError("the simulation read real time")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "sleep"):
        monkeypatch.setattr(time, name, forbidden)
    result = run_seed(3, MINUTES)
    assert result.events > 3000 and result.rule != "E0", result.what


def test_a_violation_prints_the_seed_the_rule_and_the_log_and_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = sim_run.run_seed

    def planted(seed: int, *args: object, **kw: object) -> sim_run.RunResult:
        result = real(seed, *args, **kw)  # type: ignore[arg-type]
        if seed == 2:
            result.rule, result.what, result.at = "S0", "vm1-1 runs on 2 powered hosts: h1, h2", 12.5
        return result

    monkeypatch.setattr("hafence.sim.__main__.run_seed", planted)
    assert main(["--seeds", "3", "--minutes", "0.5", "--tail", "20"]) == 1
    out = capsys.readouterr().out
    assert "seed 1: 0.5 simulated min" in out and "seed 3:" not in out  # stops at the first violation
    assert "seed 2 violated S0 at t=12.500000: vm1-1 runs on 2 powered hosts" in out
    assert "the last 20 of" in out and "replay: python -m hafence.sim --seed 2" in out


def test_a_violation_raised_inside_a_simulated_task_is_reported_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LeaseChanged is handled in the lease task's step: a checker raising there must not
    become a failed task (E0), nor be swallowed by whoever awaits the task."""
    from hafence.core.events import LeaseChanged
    from hafence.sim.checkers import Checkers, SafetyViolation, Violation

    def on_event(self: Checkers, service: object, event: object) -> None:
        if isinstance(event, LeaseChanged) and event.held:
            v = Violation("S9", 0, 0.0, "planted: a lease was taken")
            self.violations.append(v)
            raise SafetyViolation(v)

    monkeypatch.setattr(Checkers, "on_event", on_event)
    result = run_seed(1, 0.5)
    assert (result.rule, result.what) == ("S9", "planted: a lease was taken")
