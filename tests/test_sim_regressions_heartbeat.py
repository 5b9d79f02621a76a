"""Simulation regressions of the heartbeat monitor's load guard (L4).

Seeds 242 and 128: after several hosts went down, the only heartbeats left came
from a host whose wall clock had been stepped, so they looked late by their
``sent_at``; both monitors declared themselves overloaded ("1 of 1 heartbeats
older than 0.50s") and suspected nobody while another host lost its power. The
guard now judges a heartbeat's lateness against its own sender's clock and wants
late ones from several senders. The runs must pass, and no age-based overload
episode may appear at all (the scheduler's later changes happen to hide the
violation these seeds first showed, not the monitor's blindness).
"""

import pytest

from hafence.sim.run import run_seed


@pytest.mark.parametrize("seed", [242, 128])
def test_one_senders_stepped_clock_is_not_the_monitors_lag(seed: int) -> None:
    result = run_seed(seed)
    assert not result.rule, f"seed {seed}: {result.rule}: {result.what}"
    age_overloads = [line for line in result.log.splitlines()
                     if "monitor overloaded" in line and "heartbeats" in line and "when processed" in line]
    assert age_overloads == []


def test_a_return_from_suspicion_during_a_leadership_gap_is_announced() -> None:
    """Seed 966 (S1 before the fix): h2's boot lost power and was suspected; its fence,
    its BMC dead with it, was escalated. Power came back (a new boot) while neither
    monitor held the lease, so nobody said h2 was alive; the scheduler kept h2's old
    incident open until the new boot went silent and its suspicion replaced it, then
    restarted a VM a compromised agent had claimed (vm2-1) while the checker still saw
    the old boot's incident open. A monitor taking the lease now says alive for the
    hosts it heard return since it last took it."""
    result = run_seed(966)
    assert not result.rule, f"seed 966: {result.rule}: {result.what}"
    assert "host is alive host=h2" in result.log
