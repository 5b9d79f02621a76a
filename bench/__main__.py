"""``make bench``: hafence's figures, each printed as a table row.

Run one with ``python -m bench NAME``; all without arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench.failover_scale import failover_scale
from bench.fence_latency import fence_latency
from bench.heartbeat_ingest import heartbeat_ingest
from bench.nats_sync import nats_sync
from bench.pipeline import pipeline_overhead
from bench.placement import placement
from bench.report import Table
from bench.sim import sim

BENCHES = {
    "pipeline": pipeline_overhead,
    "fence": fence_latency,
    "placement": placement,
    "ingest": heartbeat_ingest,
    "failover-scale": failover_scale,
    "nats-sync": nats_sync,
    "sim": sim,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[[], *BENCHES], help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, not a figure)")
    args = parser.parse_args(argv)
    table = Table()
    for name in args.names or list(BENCHES):
        print(f"running {name} …", file=sys.stderr, flush=True)
        asyncio.run(BENCHES[name](table, quick=args.quick))
    print()
    print(table.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
