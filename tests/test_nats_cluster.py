"""hafence on a real 3-node NATS cluster: three routed nats-server processes,
JetStream clustered, the streams and the lease bucket at 3 replicas, every
service and agent given all three URLs.

A host hangs; right after it is declared suspect, the NATS node leading the
events stream (the stream every incident event goes through) is killed with
SIGKILL. The failover still completes: a confirmed fence, every HA VM running
exactly once on a survivor. Then the node restarts, rejoins (its replicas
current again), and a second host's failover completes with it back.
"""

from __future__ import annotations

import pytest

from hafence.bus.names import StreamNames
from hafence.contracts import FenceResult
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done
from hafence.lab.natscluster import stream_leader

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def running_once(lab: Lab, dead: set[str], expected: set[str]) -> bool:
    """Every expected VM runs on exactly one survivor, and no VM runs twice anywhere alive."""
    counts: dict[str, int] = {}
    for host, inv in lab.latest_inventories().items():
        if host in dead:
            continue
        for vm in inv.vms:
            if vm.state == "running":
                counts[vm.spec.name] = counts.get(vm.spec.name, 0) + 1
    return all(counts.get(vm) == 1 for vm in expected) and all(n == 1 for n in counts.values())


def where(lab: Lab) -> dict[str, list[str]]:
    return {h: [f"{v.spec.name}:{v.state}" for v in inv.vms] for h, inv in lab.latest_inventories().items()}


def confirmed(lab: Lab, host: str) -> list[FenceResult]:
    return [r for r in lab.fence_results(host) if isinstance(r, FenceResult) and r.outcome == "confirmed_off"]


async def test_failover_while_the_events_stream_leader_dies_and_again_after_it_returns() -> None:
    lab = Lab(LabSpec(nats_cluster=3))
    try:
        await lab.start()
        cluster = lab.nats_cluster
        assert cluster is not None and lab.config is not None and lab.observer.nc is not None
        # Every process was given all three nodes.
        assert lab.config.nats.url == cluster.urls and len(cluster.urls.split(",")) == 3
        assert lab.config.nats.stream_replicas == 3
        await lab.wait_ready()
        js = lab.observer.nc.jetstream()
        events = StreamNames.for_prefix(lab.config.cluster.subject_prefix).events
        info = await js.stream_info(events)
        assert info.config.num_replicas == 3 and info.cluster is not None
        assert len(info.cluster.replicas or []) == 2

        # 1. A host hangs; the events stream's leader node dies right after the suspect.
        first = "lab-2"
        expected = {vm.name for vm in lab.config.vms_of(first) if vm.ha}
        lab.crash(first)
        assert await lab.observer.wait_for(lambda: bool(lab.events("suspect", first)), 30), lab.diagnostics()
        killed = await stream_leader(js, events)
        assert killed, "the events stream has no leader"
        cluster.kill(killed)

        assert await lab.observer.wait_for(lambda: failover_done(lab, first, expected), 90), lab.diagnostics()
        assert await lab.observer.wait_for(lambda: running_once(lab, {first}, expected), 30), where(lab)
        assert confirmed(lab, first)
        # The stream went on under a leader elected among the survivors.
        assert await stream_leader(js, events) not in ("", killed)

        # 2. The node comes back and catches up: every stream, the bucket and the fencer's
        # consumer again have a leader and all replicas current.
        cluster.restart(killed)
        await cluster.wait_meta_leader(60)
        await lab.wait_stream_leaders(60)
        assert killed in cluster.running()

        second = "lab-3"
        expected2 = {vm.name for vm in lab.config.vms_of(second) if vm.ha}
        lab.crash(second)
        assert await lab.observer.wait_for(lambda: failover_done(lab, second, expected2), 90), lab.diagnostics()
        dead = {first, second}
        assert await lab.observer.wait_for(lambda: running_once(lab, dead, expected | expected2), 30), where(lab)
        assert confirmed(lab, second)
        # Only the two hung hosts were fenced: losing a NATS node made no one else look dead.
        assert {r.host for r in lab.fence_results() if isinstance(r, FenceResult)} == dead
    finally:
        await lab.stop()
    assert lab.nats_cluster is None or not lab.nats_cluster.running()
