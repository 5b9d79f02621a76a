"""The simulator is tested too: plant a known bug and it must find it within a
bounded number of seeds (../shared/SIMULATION.md, "Working with it"), and the
code as it is passes the seed that found it.

Each bug is planted by monkeypatching the module-level function the services call
at run time (docs/cores.md names them), never by editing code. Seeds are tried in
order from 0; the first one that violates one of the expected rules is the finding.
Runs are 5 simulated minutes (heal at 3.5) to keep the suite quick.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

import hafence.fencer.admission as admission
import hafence.fencer.drivers.watchdog as watchdog_driver
import hafence.heartbeat.liveness as liveness
import hafence.routes as routes
import hafence.scheduler.state as scheduler_state
import hafence.sim.cluster as sim_cluster
from hafence.sim.faults import KINDS
from hafence.sim.run import RunResult, run_seed

MAX_SEEDS = 30
MINUTES = 5.0


def hunt(rules: set[str], kinds: tuple[str, ...] = KINDS, seeds: int = MAX_SEEDS) -> Iterator[RunResult]:
    for seed in range(seeds):
        result = run_seed(seed, minutes=MINUTES, keep_log=False, kinds=kinds)
        yield result
        if result.rule in rules:
            return


def find(rules: set[str], kinds: tuple[str, ...] = KINDS, seeds: int = MAX_SEEDS) -> RunResult:
    tried = list(hunt(rules, kinds, seeds))
    last = tried[-1]
    assert last.rule in rules, (f"planted bug not found in {len(tried)} seeds; outcomes: "
                                + "; ".join(f"{r.seed}:{r.rule or 'ok'}" for r in tried))
    return last


def passes_unplanted(monkeypatch: pytest.MonkeyPatch, seed: int, kinds: tuple[str, ...] = KINDS,
                     watchdogs: bool = True) -> None:
    monkeypatch.undo()
    if not watchdogs:
        no_watchdogs(monkeypatch)
    result = run_seed(seed, minutes=MINUTES, keep_log=False, kinds=kinds)
    assert result.ok, f"the code as it is fails seed {seed}: {result.rule}: {result.what[:500]}"


def test_a_scheduler_that_starts_before_confirmed_off_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every host event and fence result "releases" the host's VMs.
    monkeypatch.setattr(scheduler_state, "host_released", lambda fact, incident, boot: True)
    kinds = ("host_cut_nats", "service_crash", "network")
    found = find({"S1", "S0"}, kinds)
    passes_unplanted(monkeypatch, found.seed, kinds)


def _decode_by_type_not_subject(self: routes.Routes, subject: str, data: bytes,
                                accepts: tuple[type[Any], ...] | None = None) -> Any:
    """The planted S5 bug: a message is decoded as whatever the consumer accepts,
    whichever subject it came on (a FenceResult on an agent's inventory subject)."""
    routes.check_body(data)
    types = accepts or tuple(t for r in routes.ROUTES for t in r.types)
    try:
        return self.decoder(tuple(types)).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise routes.Violation(f"undecodable message: {err}") from None


def test_a_bus_that_believes_a_message_from_the_wrong_subject_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes.Routes, "decode", _decode_by_type_not_subject)
    kinds = ("compromised_agent", "host_cut_nats", "service_crash")
    found = find({"S1", "S2", "S0"}, kinds)
    passes_unplanted(monkeypatch, found.seed, kinds)


def _constant_incident(host: str, boot_id: str, seq: int, nonce: str) -> str:
    return f"{host}-incident"


def no_watchdogs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clusters without watchdog hosts (their draw still taken, so the rest of each seed is
    as it was). A watchdog host recovers from what some planted bugs break: hung or cut
    off, it resets itself, and its new boot releases its old boot's VMs (the scheduler's
    rebooted rule), whatever became of the incident that should have fenced it."""
    monkeypatch.setattr(sim_cluster, "watchdog_hosts", lambda shape, rng: (rng.random(), set())[1])


def test_a_monitor_that_reuses_incident_ids_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # With watchdog hosts the dropped suspect goes unseen: the host resets itself within
    # its watchdog timeout and the new boot's rebooted rule restarts its VMs (90 seeds of
    # this mix with watchdogs drawn as run_seed draws them: no violation).
    no_watchdogs(monkeypatch)
    monkeypatch.setattr(liveness, "new_incident_id", _constant_incident)
    kinds = ("host_cut_nats", "host_comes_back", "host_power_loss", "host_hang")
    found = find({"S0", "S1", "S2", "L1"}, kinds)
    passes_unplanted(monkeypatch, found.seed, kinds, watchdogs=False)


def _admit_every_term(term: int, highest: int) -> admission.Admission:
    return admission.Admission(True, max(term, highest))


def test_a_fencer_without_its_term_check_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # What reaches the fencer is the stale_leader fault's stale request: a suspended
    # leader wakes with a failed fence in its backlog and retries it under its old term
    # after the other replica's newer term was admitted. With the check gone the fencer
    # answers it from its journal (no power run): S3 judges the admission itself.
    monkeypatch.setattr(admission, "admit", _admit_every_term)
    # Faults of the control plane only: the whole swarm finds it too (seed 2), but that
    # seed's host faults also hit a known liveness gap of the code as it is (L1: a host
    # reset with a new boot before its incident's fence loses its VMs), so the code as
    # it is could not pass it.
    kinds = ("stale_leader", "service_crash", "service_pause", "clock_stall", "device_fault", "network")
    found = find({"S3"}, kinds)
    passes_unplanted(monkeypatch, found.seed, kinds)


def test_a_fencer_that_confirms_its_watchdog_level_before_msgwait_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # msgwait forgotten: the watchdog level reads "off" half a second after the pill and
    # the monitor's last view, before the host's watchdog could have fired. Found where a
    # watchdog host fails while its BMC refuses the fencer at once (a BMC that times out
    # or stays on takes longer than the watchdog): seed 35 of this mix, h3 crashed, pill
    # written, "confirmed" 0.6 s later with the host still powered in the pill's boot.
    monkeypatch.setattr(watchdog_driver, "msgwait_s", lambda device, storage, record: 0.5)
    kinds = ("device_fault", "host_cut_nats", "host_hang", "host_crash")
    found = find({"S2"}, kinds, seeds=40)
    passes_unplanted(monkeypatch, found.seed, kinds)
