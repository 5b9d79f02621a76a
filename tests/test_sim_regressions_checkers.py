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


def test_a_suspect_no_service_could_know_of_holds_no_start() -> None:
    """Seed 219 with fences that reboot (S1 before the fix, once placement records
    changed the run's timing): h1 lost power; a monitor cut off from NATS decided it
    suspect at t=419.44 and stored that only after the heal; meanwhile h1's new boot
    reported and the scheduler released the old boot's VMs (a new boot proves the old
    one gone) and started vm1-2 on h3. No service could know of the incident: it
    begins, for S1, when its suspect is stored (test_sim_checkers.py)."""
    result = run_seed(219, keep_log=False, reboot_share=0.75)
    assert result.ok, f"{result.rule}: {result.what[:500]}"
