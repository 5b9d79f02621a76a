"""A real NATS cluster for the lab and the tests: three (or five) ``nats-server``
processes on 127.0.0.1, routed to each other, with JetStream clustered.

Each node has its own server name (``nats-1``…), client, route and monitoring
ports, and store directory; its config file is written next to its store. The
cluster is what the compose ``nats-cluster`` profile runs, on one machine:
routes to every other node, the project's streams and bucket provisioned with
as many replicas as nodes, and every client given all the client URLs.

``wait_meta_leader`` and ``wait_stream_leaders`` are the bounded waits a lab
needs before it provisions and before it starts services: a JetStream cluster
answers API calls only once its nodes have elected a meta leader, and a stream
takes writes only once its replicas have elected the stream's leader.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from hafence.lab.natsserver import NatsServer, free_port

# (client port, monitoring port, JetStream store dir) -> the config text of one
# node without its cluster block: the lab's secure mode renders the deploy
# config (users and permissions) here.
BaseConf = Callable[[int, int, str], str]


def plain_conf(port: int, http_port: int, store_dir: str) -> str:
    return "\n".join([
        f"port: {port}",
        f"http_port: {http_port}",
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "}",
        "",
    ])


class NatsCluster:
    def __init__(self, base_dir: str | os.PathLike[str], size: int = 3, name: str = "hafence",
                 host: str = "127.0.0.1", base_conf: BaseConf = plain_conf,
                 env: dict[str, str] | None = None) -> None:
        # Raft needs a majority: with 2 nodes one failure stops JetStream, with 4 no better than 3.
        if size not in (3, 5):
            raise ValueError(f"a NATS cluster of {size} nodes: use 3 or 5 (a majority must survive a failure)")
        self.dir = Path(base_dir)
        self.name = name
        self.host = host
        self.base_conf = base_conf
        self.names = [f"nats-{i}" for i in range(1, size + 1)]
        self.route_ports = [free_port() for _ in self.names]
        self.http_ports = [free_port() for _ in self.names]
        self.nodes = [
            NatsServer(self.dir / n, config_file=str(self.dir / n / "nats.conf"), host=host, env=env)
            for n in self.names
        ]

    @property
    def urls(self) -> str:
        """Every client URL, comma-separated: what ``[nats] url`` and ``HAFENCE_NATS_URL`` take."""
        return ",".join(node.url for node in self.nodes)

    def node_conf(self, i: int) -> str:
        node = self.nodes[i]
        routes = ", ".join(f'"nats-route://{self.host}:{p}"' for j, p in enumerate(self.route_ports) if j != i)
        return self.base_conf(node.port, self.http_ports[i], str(node.store_dir / "js")) + "\n".join([
            # JetStream clustering names each node; the Raft groups refer to it.
            f'server_name: "{self.names[i]}"',
            "cluster {",
            f'  name: "{self.name}"',
            f'  listen: "{self.host}:{self.route_ports[i]}"',
            f"  routes: [{routes}]",
            "}",
            "",
        ])

    def index(self, node: int | str) -> int:
        if isinstance(node, int):
            return node
        try:
            return self.names.index(node)
        except ValueError:
            raise ValueError(f"no NATS node named {node!r} (nodes: {', '.join(self.names)})") from None

    def write_configs(self) -> None:
        for i, node in enumerate(self.nodes):
            node.store_dir.mkdir(parents=True, exist_ok=True)
            Path(node.config_file).write_text(self.node_conf(i))

    def start(self) -> NatsCluster:
        self.write_configs()
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, node: int | str) -> None:
        """SIGKILL one node: a crash, no leadership handed over."""
        self.nodes[self.index(node)].kill()

    def restart(self, node: int | str) -> None:
        """Start a stopped or killed node again: same ports, same store, it rejoins."""
        n = self.nodes[self.index(node)]
        n.stop()
        n.start()

    def running(self) -> list[str]:
        return [name for name, node in zip(self.names, self.nodes, strict=True) if node.alive()]

    def _get(self, i: int, path: str) -> tuple[int, dict[str, object]]:
        url = f"http://{self.host}:{self.http_ports[i]}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:  # /healthz answers 503 with a reason
            try:
                return err.code, json.loads(err.read() or b"{}")
            except ValueError:
                return err.code, {}
        except (OSError, ValueError) as err:
            return 0, {"error": str(err)}

    def health(self) -> dict[str, str]:
        """Each running node's ``/healthz``: "ok", or why not (e.g. no meta leader yet)."""
        out = {}
        for i, name in enumerate(self.names):
            if not self.nodes[i].alive():
                continue
            status, body = self._get(i, "/healthz")
            out[name] = "ok" if status == 200 else str(body.get("error") or body.get("status") or status)
        return out

    def meta_leader(self) -> str:
        """The JetStream meta leader as the running nodes see it ("" if they disagree or have none)."""
        seen = set()
        for i, node in enumerate(self.nodes):
            if not node.alive():
                continue
            _, body = self._get(i, "/jsz")
            meta = body.get("meta_cluster")
            seen.add(str(meta.get("leader", "")) if isinstance(meta, dict) else "")
        return seen.pop() if len(seen) == 1 else ""

    async def wait_meta_leader(self, timeout: float = 30.0) -> str:
        """Wait until every running node knows the same meta leader and reports healthy."""
        deadline = time.monotonic() + timeout
        while True:
            leader = await asyncio.to_thread(self.meta_leader)
            health = await asyncio.to_thread(self.health)
            if leader and all(v == "ok" for v in health.values()):
                return leader
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"NATS cluster {self.name}: no JetStream meta leader agreed by all running nodes within "
                    f"{timeout}s (meta leader {leader or 'none'}; health {health}; logs in {self.dir}/nats-*/)")
            await asyncio.sleep(0.2)


async def stream_leader(js: JetStreamContext, stream: str) -> str:
    """The server name of the node leading a stream's Raft group ("" while it has none)."""
    try:
        info = await js.stream_info(stream)
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError):
        return ""
    return (info.cluster.leader or "") if info.cluster else ""


async def wait_stream_leaders(js: JetStreamContext, streams: list[str], replicas: int,
                              consumers: tuple[tuple[str, str], ...] = (), timeout: float = 30.0) -> dict[str, str]:
    """Wait until each stream has a leader and ``replicas - 1`` current followers,
    and each (stream, durable) consumer a leader; returns stream -> leader."""
    deadline = time.monotonic() + timeout
    while True:
        waiting: dict[str, str] = {}
        leaders: dict[str, str] = {}
        for stream in streams:
            try:
                info = await js.stream_info(stream)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
                waiting[stream] = f"{type(err).__name__}: {err}"
                continue
            cluster = info.cluster
            leader = (cluster.leader or "") if cluster else ""
            current = [p.name for p in (cluster.replicas or []) if p.current] if cluster else []
            if not leader or len(current) < replicas - 1:
                waiting[stream] = f"leader {leader or 'none'}, current followers {current}"
            else:
                leaders[stream] = leader
        for stream, durable in consumers:
            try:
                cinfo = await js.consumer_info(stream, durable)
                if not (cinfo.cluster and cinfo.cluster.leader):
                    waiting[f"{stream}/{durable}"] = "no leader"
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as err:
                waiting[f"{stream}/{durable}"] = f"{type(err).__name__}: {err}"
        if not waiting:
            return leaders
        if time.monotonic() > deadline:
            raise RuntimeError(f"JetStream streams without a leader and {replicas} current replicas after "
                               f"{timeout}s: {waiting}")
        await asyncio.sleep(0.2)
