"""Seeds where the simulation's checkers, not a service, were wrong, kept as
regressions (each ran red before the checker's fix, on the tree of the fix)."""

from __future__ import annotations

import pytest

from hafence.sim.run import run_seed

pytestmark = pytest.mark.timeout(300)


def test_a_fence_that_took_a_boot_down_under_a_forged_boot_id_releases_that_boot() -> None:
    """Seed 541 (S1 before the fix): the compromised agent on h5 forged its own boot id
    on heartbeats while its agent was down; the monitor opened an incident of the forged
    boot, the fence's pill reset the real boot (msgwait passed, the watchdog fired), and a
    later incident of the real boot was still open when the confirmed_off (naming the
    forged boot) released its VMs. The scheduler was right (the power reading, here the
    pill's reset, came after the real boot's last report); the checker now accepts a
    confirmed_off naming a boot the host never had whose run the world shows took that
    very boot down (a result of another real incident still releases nothing:
    test_sim_checkers.py)."""
    result = run_seed(541, keep_log=False)
    assert result.ok, f"{result.rule}: {result.what[:500]}"
