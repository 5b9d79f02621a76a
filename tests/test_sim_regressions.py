"""Seeds the simulation found scheduler violations in, kept as regressions: each ran
red on the scheduler before its fix (on the tree of the fix: any change of a service
or of the simulator redraws what a seed does, so a seed that passes here proves the
fix only on the tree it was found on; the scheduler's unit tests pin each rule)."""

from __future__ import annotations

import pytest

from hafence.sim.run import run_seed

pytestmark = pytest.mark.timeout(300)

# seed -> what it showed before the fix
SEEDS = {
    # S1: a scheduler leader woken from a suspension its monotonic clock missed started
    # vm2-1 on h1, which the other scheduler had placed meanwhile; fixed by the placed
    # compare-and-set (a start goes out only once its placed is stored).
    73: "S1 at t=175.9: scheduler-1 starts vm2-1 on h1 while h2, where it ran, is in an open incident",
    # L1: a host rebooted (new boot id) with no incident of its old boot open, or the
    # incident closed by its return; the old boot's HA VMs were never restarted.
    5: "L1: vm2-1, vm2-2, vm4-1 (last on h2: powered, boot 2) run nowhere",
    8: "L1: vm2-2, vm5-1 (last on h2: powered, boot 3) run nowhere",
    72: "L1: vm1-1, vm1-2 (last on h1, boot 2) run nowhere",
    225: "L1: eight HA VMs (last on h3, h4, h5: powered, boot 2) run nowhere",
    128: "L1: vm1-1, vm1-2 (last on h1: powered, boot 3), vm2-1, vm2-2 (last on h2: powered, boot 2)... run nowhere",
}


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_the_seed_runs_without_a_violation(seed: int) -> None:
    result = run_seed(seed, keep_log=False)
    assert not result.rule, f"seed {seed} (before: {SEEDS[seed]}): {result.rule} at t={result.at}: {result.what}"
