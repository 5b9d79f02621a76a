"""``python -m hafence.sim``: run simulated clusters, one seed each, and judge them.

    python -m hafence.sim --seeds 300          # seeds 1..300
    python -m hafence.sim --seeds 100 --from 501
    python -m hafence.sim --seed 17            # one seed; its whole event log on a violation
    python -m hafence.sim --seeds 300 --jobs 2 --minutes 10 --hosts 5

One line per seed (seed, simulated minutes, steps, faults drawn, fences, VM starts,
verdict). On a violation: the seed, the rule, and the event log up to it (the
whole log for ``--seed``; with ``--seeds``, the last ``--tail`` lines, the whole log
written to ``--log-dir``), and the exit status is 1. A seed's run does not depend on
which other seeds run, on ``--jobs`` or on the process: ``--seed S`` replays it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TextIO

from hafence.sim.run import DEFAULT_MINUTES, RunResult, run_seed


def _run(args: tuple[int, float, int, bool, float | None]) -> RunResult:
    seed, minutes, hosts, keep_log, reboot_share = args
    if reboot_share is None:  # the call as it always was (tests replace run_seed with it)
        return run_seed(seed, minutes, hosts, keep_log=keep_log)
    return run_seed(seed, minutes, hosts, keep_log=keep_log, reboot_share=reboot_share)


def results(seeds: list[int], minutes: float, hosts: int, jobs: int, keep_log: bool,
            reboot_share: float | None = None) -> Iterator[RunResult]:
    """Each seed's result, in seed order."""
    work = [(seed, minutes, hosts, keep_log, reboot_share) for seed in seeds]
    if jobs <= 1:
        yield from map(_run, work)
        return
    pool = ProcessPoolExecutor(max_workers=jobs)
    try:
        yield from pool.map(_run, work, chunksize=1)
    finally:
        # Stopped early (a violation): seeds not yet begun are dropped, not run.
        pool.shutdown(wait=True, cancel_futures=True)


def report_violation(result: RunResult, tail: int, log_dir: Path | None, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    print(f"\nseed {result.seed} violated {result.rule} at t={result.at:.6f}: {result.what}", file=out)
    print(result.plan, file=out)
    lines = result.log.splitlines()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"sim-seed-{result.seed}.log"
        path.write_text(result.log)
        print(f"the whole event log ({len(lines)} lines): {path}", file=out)
    shown = lines if tail <= 0 else lines[-tail:]
    if len(shown) < len(lines):
        print(f"... the last {len(shown)} of {len(lines)} lines of the event log:", file=out)
    print("\n".join(shown), file=out)
    share = "" if result.reboot_share is None else f" --reboot-share {result.reboot_share:g}"
    print(f"replay: python -m hafence.sim --seed {result.seed} --minutes {result.minutes:g} --hosts {result.hosts}"
          f"{share}", file=out)


def excused_summary(vms: dict[str, int], seeds: dict[str, int], any_seeds: int, ran: int) -> str:
    """``no VM in 300 seed(s)`` or ``12 VM(s) in 5 of 300 seed(s) (no room: 10 VM(s) in 4 seed(s);
    given up: 2 VM(s) in 1 seed(s))``."""
    if not vms:
        return f"no VM in {ran} seed(s)"
    parts = "; ".join(f"{why}: {vms[why]} VM(s) in {seeds[why]} seed(s)" for why in sorted(vms))
    return f"{sum(vms.values())} VM(s) in {any_seeds} of {ran} seed(s) ({parts})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hafence.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--seeds", type=int, metavar="N", help="run N seeds (1..N, or from --from)")
    which.add_argument("--seed", type=int, metavar="S", help="run seed S alone")
    parser.add_argument("--from", dest="first", type=int, default=1, metavar="K", help="first seed of --seeds")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="simulated minutes per seed")
    parser.add_argument("--hosts", type=int, default=5, help="hosts per simulated cluster")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (processes)")
    parser.add_argument("--reboot-share", type=float, default=None, metavar="P",
                        help="share of seeds whose fences reboot the host, cleared automatically once clean "
                             "(default: the shape's, 0; 0.75 gives L1 room in most seeds)")
    parser.add_argument("--tail", type=int, default=300,
                        help="lines of a failing seed's log to print with --seeds (0: all)")
    parser.add_argument("--log-dir", type=Path, default=None, help="write a failing seed's whole log there")
    parser.add_argument("--keep-going", action="store_true", help="run every seed even after a violation")
    parser.add_argument("--print-log", action="store_true", help="with --seed: print the event log even if it passed")
    args = parser.parse_args(argv)

    seeds = [args.seed] if args.seed is not None else list(range(args.first, args.first + args.seeds))
    failed: list[RunResult] = []
    steps = minutes = 0.0
    ran = 0
    excused_vms: dict[str, int] = {}  # why -> VMs L1 excused, over the batch
    excused_seeds: dict[str, int] = {}  # why -> seeds with such an excuse
    excused_any = 0  # seeds with any excuse
    # Logs are kept only where they will be shown: a failing seed of a batch is run again
    # with its log (the same seed gives the same run).
    keep = args.seed is not None
    began = time.perf_counter()  # the command's own duration, on stderr; no simulated run reads a clock
    for result in results(seeds, args.minutes, args.hosts, args.jobs, keep, args.reboot_share):
        print(result.summary(), flush=True)
        ran += 1
        steps += result.steps
        minutes += result.minutes
        excused_any += 1 if result.excused else 0
        for why, vms in result.excused.items():
            excused_vms[why] = excused_vms.get(why, 0) + vms
            excused_seeds[why] = excused_seeds.get(why, 0) + 1
        if not result.ok:
            failed.append(result)
            if not args.keep_going:
                break
    for result in failed:
        if not result.log:
            result = _run((result.seed, result.minutes, result.hosts, True, args.reboot_share))
        report_violation(result, 0 if args.seed is not None else args.tail, args.log_dir)
    if args.seed is not None and args.print_log and not failed:
        print(_run((args.seed, args.minutes, args.hosts, True, args.reboot_share)).log, end="")
    print(f"{ran} seed(s), {minutes:g} simulated minutes, {steps:.0f} steps: "
          f"{'all passed' if not failed else f'{len(failed)} violated'}", flush=True)
    # How much L1 really checked: a seed excused by "no room" checked no recovery at all.
    print(f"L1 excused: {excused_summary(excused_vms, excused_seeds, excused_any, ran)}", flush=True)
    took = time.perf_counter() - began
    print(f"{ran} seed(s) in {took:.1f} s: {took / max(ran, 1):.2f} s per seed with {args.jobs} job(s)",
          file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
