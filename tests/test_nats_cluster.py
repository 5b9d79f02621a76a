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

import asyncio
import os
import re
import sys
from pathlib import Path

import nats
import nats.errors
import pytest
import yaml
from nats.js import JetStreamContext

from hafence import natsconf
from hafence.bus.names import StreamNames
from hafence.config import load_config
from hafence.contracts import FenceResult
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done
from hafence.lab.natscluster import NatsCluster, wait_stream_leaders
from hafence.lab.natsserver import NatsServer, free_port
from tests.conftest import eventually

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


async def stores_starts(js: JetStreamContext, events: str, vms: set[str]) -> bool:
    """The events stream holds a 'started' event of each of the VMs (its leader answers)."""
    try:
        info = await js.stream_info(events, subjects_filter="hafence.vm.*.started")
    except (nats.errors.Error, TimeoutError):
        return False
    return vms <= {subject.split(".")[2] for subject in (info.state.subjects or {})}


def confirmed(lab: Lab, host: str) -> list[FenceResult]:
    return [r for r in lab.fence_results(host) if isinstance(r, FenceResult) and r.outcome == "confirmed_off"]


async def test_failover_while_the_events_stream_leader_dies_and_again_after_it_returns() -> None:
    # secure: each process with its own NATS user and the deploy's permissions, as in compose.
    lab = Lab(LabSpec(nats_cluster=3, secure=True))
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
        killed = (await wait_stream_leaders(js, [events], replicas=3, timeout=30))[events]
        cluster.kill(killed)
        # Mid-incident: the arbiter waits a settle time (2 heartbeat intervals) after a suspect.
        assert not confirmed(lab, first), "the fence was done before the NATS node was killed"

        assert await lab.observer.wait_for(lambda: failover_done(lab, first, expected), 90), lab.diagnostics()
        assert await lab.observer.wait_for(lambda: running_once(lab, {first}, expected), 30), where(lab)
        assert confirmed(lab, first)
        # The stream went on under a leader elected among the survivors, and holds the incident.
        leaders = await wait_stream_leaders(js, [events], replicas=2, timeout=60)
        assert leaders[events] != killed
        # The scheduler learns of the fence from this stream, so its starts come once the
        # stream has its new leader: they must be stored, not only seen on the wire.
        await eventually(lambda: stores_starts(js, events, expected), 30)

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
        await eventually(lambda: stores_starts(js, events, expected | expected2), 30)
        # Only the two hung hosts were fenced: losing a NATS node made no one else look dead.
        assert {r.host for r in lab.fence_results() if isinstance(r, FenceResult)} == dead
    finally:
        await lab.stop()
    assert lab.nats_cluster is None or not lab.nats_cluster.running()


ROOT = Path(__file__).resolve().parent.parent


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}``, enough for our file."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], text)


async def test_the_compose_nats_cluster_profile_runs_as_a_cluster_with_three_replicas(tmp_path: Path) -> None:
    """The compose profile's three nodes, run as they are written (their command-line
    options, deploy/nats.conf with its users) with only the addresses mapped to
    127.0.0.1 ports; then the compose provisioner's command, given the env file's URLs.
    Nothing waits for a meta leader before the provisioner, as in compose."""
    env_file = dict(line.split("=", 1) for line in (ROOT / "deploy" / "nats-cluster.env").read_text().splitlines()
                    if line and not line.startswith("#"))
    compose = yaml.safe_load(_interpolate((ROOT / "docker-compose.yml").read_text(), env_file))
    nodes = {name: svc for name, svc in compose["services"].items() if "nats-cluster" in svc.get("profiles", [])}
    assert len(nodes) == 3
    config = load_config(ROOT / "deploy" / "cluster.toml")
    passwords = {user: natsconf.new_password() for user in natsconf.permissions(config)}
    server_env = {natsconf.password_env(user): pw for user, pw in passwords.items()}
    route = {name: free_port() for name in nodes}
    servers: dict[str, NatsServer] = {}
    for name, svc in nodes.items():
        command = list(svc["command"])
        # Every node is given the others as routes, the cluster name and a server name.
        assert command[command.index("--name") + 1] == name
        assert command[command.index("--cluster_name") + 1] == "hafence"
        assert command[command.index("--cluster") + 1] == "nats://0.0.0.0:6222"
        routes = command[command.index("--routes") + 1].split(",")
        assert sorted(routes) == sorted(f"nats://{other}:6222" for other in nodes if other != name)
        assert "./deploy/nats.conf:/etc/nats/nats.conf:ro" in svc["volumes"]
        # One machine: each node on ports of its own instead of a container's 4222/6222/8222.
        command[command.index("--cluster") + 1] = f"nats://127.0.0.1:{route[name]}"
        command[command.index("--routes") + 1] = ",".join(
            f"nats://127.0.0.1:{route[r.removeprefix('nats://').split(':')[0]]}" for r in routes)
        conf_i = command.index("-c")
        del command[conf_i:conf_i + 2]
        node = NatsServer(tmp_path / name, env=server_env, args=command)
        text = (ROOT / "deploy" / "nats.conf").read_text()
        for old, new in (("port: 4222", f"port: {node.port}"), ("http_port: 8222", f"http_port: {free_port()}"),
                         ('store_dir: "/data/jetstream"', f'store_dir: "{tmp_path / name / "js"}"')):
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        (tmp_path / f"{name}.conf").write_text(text)
        node.config_file = str(tmp_path / f"{name}.conf")
        servers[name] = node
    try:
        for node in servers.values():
            node.start()
        # HAFENCE_NATS_URL of every hafence container: all three nodes.
        urls = env_file["HAFENCE_NATS_URL"].split(",")
        assert sorted(u.removeprefix("nats://").split(":")[0] for u in urls) == sorted(nodes)
        local_urls = ",".join(servers[u.removeprefix("nats://").split(":")[0]].url for u in urls)
        provision = compose["services"]["provision"]
        command = list(provision["command"])
        assert provision["environment"]["HAFENCE_NATS_URL"] == env_file["HAFENCE_NATS_URL"]
        command[command.index("--config") + 1] = str(ROOT / "deploy" / "cluster.toml")
        (tmp_path / "provisioner").write_text(passwords["provisioner"] + "\n")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "HAFENCE_NATS_URL": local_urls, "HAFENCE_NATS_USER": "provisioner",
                 "HAFENCE_NATS_PASSWORD_FILE": str(tmp_path / "provisioner")})
        out = (await asyncio.wait_for(proc.communicate(), 120))[0].decode(errors="replace")
        assert proc.returncode == 0, out
        assert "(replicas 3)" in out, out

        names = StreamNames.for_prefix(config.cluster.subject_prefix)
        nc = await nats.connect(servers=local_urls.split(","), user="provisioner", password=passwords["provisioner"],
                                inbox_prefix=natsconf.inbox_prefix("provisioner"))
        try:
            js = nc.jetstream()
            streams = [names.events, names.fence_requests, names.dlq, f"KV_{names.leases}"]
            await wait_stream_leaders(js, streams, 3, consumers=((names.fence_requests, "fencer"),), timeout=60)
            for stream in streams:
                info = await js.stream_info(stream)
                assert info.config.num_replicas == 3, stream
                assert info.cluster is not None and info.cluster.name == "hafence"
                assert {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])} == set(nodes)
        finally:
            await nc.close()
    finally:
        for node in servers.values():
            node.stop()


async def test_the_provisioner_waits_for_the_clusters_meta_leader(tmp_path: Path) -> None:
    """Compose starts the provisioner with the NATS nodes; until a majority is up there
    is no meta leader and JetStream answers nothing. `--wait` covers that too (before,
    the first timeout ended the provisioner with "TimeoutError: nats: timeout")."""
    cluster = NatsCluster(tmp_path / "nats")
    cluster.write_configs()
    config = tmp_path / "cluster.toml"
    config.write_text(f'[nats]\nurl = "{cluster.urls}"\nstream_replicas = 3\n\n'
                      '[[hosts]]\nname = "h1"\nmemory_mb = 1024\nlevels = []\n')
    try:
        cluster.nodes[0].start()  # one of three: no quorum, no meta leader
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hafence.cli", "deploy", "provision", "--config", str(config), "--wait", "120",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert proc.stderr is not None
            first = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert "JetStream did not answer" in first and "meta leader" in first and "retrying" in first, first
            cluster.nodes[1].start()
            cluster.nodes[2].start()
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, (out + err).decode()
        assert f"stream {StreamNames.for_prefix('hafence').events}: ok (replicas 3)" in out.decode()
    finally:
        cluster.stop()
