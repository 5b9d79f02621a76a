"""deploy's NATS permissions, on a real nats-server: what each identity may and
may not publish, and a whole failover running under them."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import nats
import pytest

from hafence import natsconf
from hafence.config import parse_config
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done
from hafence.lab.natsserver import NatsServer, find_nats_server, free_port

CLUSTER = """
[[hosts]]
name = "h1"
memory_mb = 1024
[[hosts]]
name = "h2"
memory_mb = 1024
"""


def test_the_generated_config_is_accepted_by_nats_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(CLUSTER)
    conf = tmp_path / "nats.conf"
    conf.write_text(natsconf.render(config, store_dir=str(tmp_path / "js")))
    for user in natsconf.permissions(config):
        monkeypatch.setenv(natsconf.password_env(user), "x")
    result = subprocess.run([find_nats_server(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_deploy_config_is_the_generated_one_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/nats.conf is generated from deploy/cluster.toml; it must not drift from it."""
    root = Path(__file__).resolve().parents[1]
    config = parse_config((root / "deploy" / "cluster.toml").read_text(), "deploy/cluster.toml")
    assert (root / "deploy" / "nats.conf").read_text() == natsconf.render(config)
    for user in natsconf.permissions(config):
        monkeypatch.setenv(natsconf.password_env(user), "x")
    result = subprocess.run([find_nats_server(), "-t", "-c", str(root / "deploy" / "nats.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_an_agent_cannot_publish_fence_requests_results_or_another_hosts_heartbeat(tmp_path: Path) -> None:
    config = parse_config(CLUSTER)
    passwords = {user: f"pw-{user}" for user in natsconf.permissions(config)}
    conf = tmp_path / "nats.conf"
    server = NatsServer(tmp_path / "nats", config_file=str(conf))
    conf.write_text(natsconf.render(config, passwords, store_dir=str(tmp_path / "js"), port=server.port,
                                    http_port=free_port()))
    server.start()
    try:
        watcher = await nats.connect(server.url, user="operator", password=passwords["operator"])
        seen: list[str] = []

        async def saw(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.subject)

        await watcher.subscribe("hafence.>", cb=saw)
        violations: list[str] = []

        async def on_error(err: Exception) -> None:
            violations.append(str(err))

        agent = await nats.connect(server.url, user="agent-h1", password=passwords["agent-h1"], error_cb=on_error)
        forbidden = ["hafence.fence.request.h2", "hafence.fence.result.h2", "hafence.hb.h2",
                     "hafence.host.h2.confirmed_fenced", "hafence.vm.x.started"]
        for subject in forbidden:
            await agent.publish(subject, b"{}")
        await agent.publish("hafence.hb.h1", b"{}")  # its own heartbeat is fine
        await agent.flush()
        arbiter = await nats.connect(server.url, user="arbiter", password=passwords["arbiter"])
        await arbiter.publish("hafence.fence.request.h2", b"{}")
        await arbiter.flush()
        scheduler = await nats.connect(server.url, user="scheduler", password=passwords["scheduler"],
                                       error_cb=on_error)
        await scheduler.publish("hafence.fence.request.h2", b"{}")
        await scheduler.flush()
        await asyncio.sleep(0.3)
        assert seen == ["hafence.hb.h1", "hafence.fence.request.h2"]
        for subject in [*forbidden, "hafence.fence.request.h2"]:
            assert any(subject in v for v in violations), (subject, violations)
        with pytest.raises(nats.errors.Error):
            await nats.connect(server.url, user="agent-h1", password="wrong", connect_timeout=2,
                               max_reconnect_attempts=0, allow_reconnect=False)
        for client in (watcher, agent, arbiter, scheduler):
            await client.close()
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_a_whole_failover_runs_under_the_deploy_permissions() -> None:
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, secure=True))
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        expected = {vm.name for vm in lab.config.vms_of("lab-2") if vm.ha}
        lab.crash("lab-2")
        assert await lab.observer.wait_for(lambda: failover_done(lab, "lab-2", expected), 30), lab.diagnostics()
        log = (lab.dir / "nats" / "nats-server.log").read_text()
        assert "Permissions Violation" not in log
    finally:
        await lab.stop()
