"""The simulated server enforces production's NATS permissions (hafence.natsconf),
so the compromised agent is held to its subjects by the same table nats.conf is
written from, and a service needing more than its identity grants is found."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hafence.config import parse_config
from hafence.sim.clock import Scheduler
from hafence.sim.permissions import identity_of, publish_grants
from hafence.sim.run import build
from hafence.sim.streams import StreamConfig
from hafence.sim.transport import CoreMsg, SimNats
from tests.conftest import cluster_toml
from tests.test_sim_transport import make as make_net


def make() -> tuple[Scheduler, SimNats]:
    s, net = make_net()
    net.add_stream(StreamConfig("EVENTS", ("ev.>",)))
    net.publish_grants = {"h1": ("hb.h1", "ev.inventory.h1")}
    return s, net


def test_a_node_publishes_only_where_its_grants_allow_and_is_refused_silently_elsewhere() -> None:
    s, net = make()
    got: list[str] = []
    net.connect("observer").subscribe(">", lambda m: got.append(m.subject))
    agent = net.connect("h1")
    s.run(until=0.1)
    agent.publish("hb.h1", b"ok")
    agent.publish("hb.h2", b"another host's heartbeat")
    s.run(until=0.2)
    assert got == ["hb.h1"]
    # A JetStream publish it may not make is not stored and never answered: it times out.
    stored = s.run_until_complete(agent.js_publish("ev.inventory.h1", b"{}"))
    assert stored.seq == 1
    with pytest.raises(TimeoutError):
        s.run_until_complete(agent.js_publish("ev.fence.result.h2", b"forged", timeout=1.0))
    assert net.streams["EVENTS"].last_seq == 1
    assert [(node, subject) for _, node, subject in net.denied] == [("h1", "hb.h2"), ("h1", "ev.fence.result.h2")]


def test_replies_to_requests_pass_and_nodes_without_grants_are_unrestricted() -> None:
    s, net = make()
    agent = net.connect("h1")

    async def answer(m: CoreMsg) -> None:
        await m.respond(b"done")

    agent.subscribe("cmd.h1", answer)  # subscribing is not what the grants cover
    scheduler = net.connect("ctl-scheduler-1")
    s.run(until=0.1)
    assert s.run_until_complete(scheduler.request("cmd.h1", b"start")).data == b"done"
    assert net.denied == []


def test_each_simulated_node_gets_its_production_identitys_publish_grants(tmp_path: Path) -> None:
    config = parse_config(cluster_toml("nats://127.0.0.1:4222", tmp_path, 2), "test.toml")
    hosts = {h.name for h in config.hosts}
    host = sorted(hosts)[0]
    assert identity_of(host, hosts) == f"agent-{host}"
    assert identity_of("ctl-arbiter-2", hosts) == "arbiter"
    assert identity_of("ctl-fencer-1", hosts) == "fencer"
    assert identity_of("nats", hosts) == ""
    grants = publish_grants(config, [host, "ctl-fencer-1", "ctl-arbiter-1", "nats"])
    assert "nats" not in grants
    assert all(not p.startswith("$") for g in grants.values() for p in g)
    p = config.cluster.subject_prefix
    assert f"{p}.hb.{host}" in grants[host] and f"{p}.inventory.{host}" in grants[host]
    # Only the fencer may produce a fence result, only the arbiter a fence request (S5).
    assert not any(".fence." in g or ".vm." in g or ".host." in g for g in grants[host])
    assert f"{p}.fence.result.*" in grants["ctl-fencer-1"]
    assert not any(g.startswith(f"{p}.fence.result") for g in grants["ctl-arbiter-1"])


def test_the_simulated_cluster_runs_every_node_under_its_grants() -> None:
    cluster, _ = build(3, minutes=1.0, keep_log=False)
    nodes = {svc.node for svc in cluster.services}
    assert set(cluster.net.publish_grants) == nodes


def test_without_the_permissions_the_compromised_agents_forbidden_lies_are_believed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug: nats.conf loses the agents' publish limits. The liar's fence
    results and operator confirmations, on their proper subjects, pass every decoder
    and route (S5's other half), so only the permissions kept them out: without them
    the simulation sees a live host's VMs restarted elsewhere. With them, the same seed
    passes and every refusal is the liar's."""
    import hafence.sim.run as sim_run
    from hafence.sim.run import run_seed

    real = sim_run.publish_grants

    def agents_unrestricted(config: Any, nodes: Any) -> dict[str, tuple[str, ...]]:
        hosts = {h.name for h in config.hosts}
        return {node: grants for node, grants in real(config, nodes).items() if node not in hosts}

    monkeypatch.setattr(sim_run, "publish_grants", agents_unrestricted)
    kinds = ("compromised_agent", "host_cut_nats", "service_crash")
    tried = []
    for seed in range(30):
        result = run_seed(seed, minutes=5.0, keep_log=False, kinds=kinds)
        tried.append(result)
        if result.rule in ("S0", "S1", "S3"):
            break
    found = tried[-1]
    print(f"found by seed {found.seed}: {found.rule}: {found.what[:200]}")
    assert found.rule in ("S0", "S1", "S3"), "; ".join(f"{r.seed}:{r.rule or 'ok'}" for r in tried)
    monkeypatch.undo()
    _, plan = build(found.seed, minutes=5.0, keep_log=False, kinds=kinds)
    again = run_seed(found.seed, minutes=5.0, keep_log=False, kinds=kinds)
    assert again.ok, f"{again.rule}: {again.what[:300]}"
    assert plan.compromised


def test_a_service_denied_what_it_publishes_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A permission table too tight for a service breaks a failover only in production:
    the simulation fails the run (E1) at the first refusal that is not the liar's."""
    import hafence.sim.run as sim_run
    from hafence.sim.run import run_seed

    real = sim_run.publish_grants
    monkeypatch.setattr(sim_run, "publish_grants", lambda config, nodes: {
        **real(config, nodes), "ctl-heartbeat-1": (), "ctl-heartbeat-2": ()})
    result = run_seed(3, minutes=2.0, keep_log=False)
    assert result.rule == "E1" and "ctl-heartbeat-" in result.what and "natsconf" in result.what
