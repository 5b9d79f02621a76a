"""An arbiter whose leader lease is broken on purpose, for the S3 test.

    python -m hafence.lab.stale_arbiter --config FILE --instance NAME

It runs the production arbiter with a ``StaleLease`` bound as its lease: a leader
that never notices it lost its lease (a partitioned leader with a frozen clock
would behave so). Once it holds a term it believes it holds it forever, never
renews and never raises its term; the fencer's term check must stop it (S3).
"""

from __future__ import annotations

import argparse
import math
import sys

from hafence.arbiter.service import run
from hafence.lease import LeaderLease
from hafence.service import service_main


class StaleLease(LeaderLease):
    def held(self) -> bool:
        return bool(self.term) or super().held()

    @property
    def valid_until(self) -> float:
        return math.inf if self.term else 0.0

    async def raise_term(self) -> bool:
        return False

    async def step(self) -> None:
        if self.term:
            return  # never renews, so never learns that somebody else took over
        await super().step()


def _bind(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(lease_factory=StaleLease)


if __name__ == "__main__":
    sys.exit(service_main("arbiter", run, add_arguments=_bind))
