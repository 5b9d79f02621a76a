"""A whole simulated cluster on one machine: a real nats-server, every hafence
service as its own process, one agent process per simulated host, and an
observer that records every message on the bus.

Used by ``make demo``, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence import natsconf
from hafence.bus.names import StreamNames
from hafence.bus.provision import fencer_locks_bucket, fencer_state_bucket
from hafence.config import ClusterConfig, parse_config
from hafence.contracts import Decoders, Inventory
from hafence.lab import netns
from hafence.lab.natscluster import NatsCluster, wait_stream_leaders
from hafence.lab.natsserver import NatsServer, free_port
from hafence.lab.netns import NetNamespace
from hafence.lab.peers import Peer, bmc_sim, free_udp_port, pdu_sim
from hafence.lab.procs import Service

SERVICES = ("heartbeat", "arbiter", "fencer", "scheduler")


def secrets_token() -> str:
    import secrets

    return secrets.token_urlsafe(12)


@dataclass(frozen=True)
class LabSpec:
    hosts: int = 4
    host_memory_mb: int = 65536
    vms_per_host: int = 3
    non_ha_every: int = 4  # every 4th VM is not HA: 12 VMs, 9 of them HA
    vm_memory_mb: int = 4096
    heartbeat_interval_s: float = 0.5
    missed_heartbeats: int = 3
    off_delay_s: float = 0.3
    lease_ttl_s: float = 3.0
    extra_vms: dict[str, int] = field(default_factory=dict)  # host -> more HA VMs (bench)
    # "ipmi": every host has a simulated BMC (IPMI over UDP); "sim": the file-based switch.
    power: str = "ipmi"
    # Hosts with a second fence level: an outlet of a simulated APC PDU (SNMP).
    pdu_hosts: tuple[str, ...] = ("lab-2",)
    # Hosts whose BMC accepts "off" but leaves the host on (level 1 fails, level 2 must act).
    stuck_bmcs: tuple[str, ...] = ()
    # A host whose agent runs in its own network namespace, so it can be partitioned.
    netns_host: str = ""
    # Agents renew a lease file on the "shared storage" (a lab directory).
    storage_lease: bool = False
    storm_share: float = 0.5
    # NATS with deploy-style per-service users and subject permissions.
    secure: bool = False
    fence_attempts: int = 3
    # VMs get priorities high, medium, low in turn (else all medium).
    mixed_priorities: bool = False
    # Hosts whose hypervisor fails every VM start.
    fail_start_hosts: tuple[str, ...] = ()
    # Hosts whose VM starts take this long (answers may come after the scheduler gave up).
    slow_start_hosts: dict[str, float] = field(default_factory=dict)
    agent_command_timeout_s: float = 10.0
    fence_retry_backoff_s: float = 15.0
    # NATS nodes: 1 (one nats-server) or 3/5 (a routed JetStream cluster; the streams and
    # the bucket get that many replicas, every process is given every node's URL).
    nats_cluster: int = 1
    # Fencer processes: "fencer", then "fencer-2", ..., each with a journal of its own.
    fencer_replicas: int = 1
    # Hosts whose only fence level is their outlet of the PDU (power = "ipmi"): hosts
    # that share one device.
    pdu_only_hosts: tuple[str, ...] = ()
    # Watchdog self-fencing (docs/watchdog.md): these hosts get a simulated watchdog
    # (hafence.lab.watchdogsim) and a last fence level "sbd" (the watchdog driver);
    # slots in <lab>/storage/slots.
    watchdog_hosts: tuple[str, ...] = ()
    watchdog_timeout_s: float = 1.0
    # Hosts whose BMC is dead (nothing answers on its port): it died with its host.
    dead_bmcs: tuple[str, ...] = ()
    isolated_host_action: str = "skip"

    def host_names(self) -> list[str]:
        return [f"lab-{i}" for i in range(1, self.hosts + 1)]


@dataclass(frozen=True)
class LabPorts:
    bmcs: dict[str, int]
    pdu: int


def render_config(spec: LabSpec, nats_url: str, lab_dir: Path, ports: LabPorts | None = None) -> str:
    lines = [
        "[cluster]",
        'name = "lab"',
        "",
        "[nats]",
        f'url = "{nats_url}"',
        *([f"stream_replicas = {spec.nats_cluster}"] if spec.nats_cluster > 1 else []),
        "",
        "[timings]",
        f"heartbeat_interval_s = {spec.heartbeat_interval_s}",
        f"missed_heartbeats = {spec.missed_heartbeats}",
        f"lease_ttl_s = {spec.lease_ttl_s}",
        "inventory_interval_s = 10.0",
        f"agent_command_timeout_s = {spec.agent_command_timeout_s}",
        "",
        "[arbiter]",
        f"storm_share = {spec.storm_share}",
        f"fence_attempts = {spec.fence_attempts}",
        f"fence_retry_backoff_s = {spec.fence_retry_backoff_s}",
        f'isolated_host_action = "{spec.isolated_host_action}"',
        "",
        "[store]",
        f'dir = "{lab_dir / "state"}"',
        "",
        *(["[storage]"] if spec.storage_lease or spec.watchdog_hosts else []),
        *([f'lease_dir = "{lab_dir / "storage"}"', "renew_interval_s = 0.5",
           "live_window_s = 3.0"] if spec.storage_lease else []),
        *([f'slot_dir = "{lab_dir / "storage" / "slots"}"', f"watchdog_timeout_s = {spec.watchdog_timeout_s}",
           f"slot_interval_s = {spec.watchdog_timeout_s / 4}", f"view_max_age_s = {spec.watchdog_timeout_s / 2}"]
          if spec.watchdog_hosts else []),
        *([""] if spec.storage_lease or spec.watchdog_hosts else []),
        *(["[devices.sbd]", 'driver = "watchdog"', f"power_timeout_s = {4 * spec.watchdog_timeout_s + 5}", ""]
          if spec.watchdog_hosts else []),
        "[devices.lab-power]",
        'driver = "sim"',
        f'state_dir = "{lab_dir / "power"}"',
        f"off_delay_s = {spec.off_delay_s}",
        "power_timeout_s = 5.0",
        "",
    ]
    if spec.power == "ipmi":
        assert ports is not None
        for host, port in ports.bmcs.items():
            lines += [
                f"[devices.bmc-{host}]",
                'driver = "ipmi"',
                'address = "127.0.0.1"',
                f"port = {port}",
                'username = "admin"',
                f'password_file = "{lab_dir / "secrets" / "bmc-password"}"',
                "timeout_s = 2.0",
                "power_timeout_s = 5.0",
                "",
            ]
        lines += [
            "[devices.pdu-1]",
            'driver = "apc_snmp"',
            'address = "127.0.0.1"',
            f"port = {ports.pdu}",
            'snmp_version = "2c"',
            f'community_file = "{lab_dir / "secrets" / "pdu-community"}"',
            "power_timeout_s = 5.0",
            "",
        ]
    for n, host in enumerate(spec.host_names(), start=1):
        if spec.power == "ipmi":
            levels = f'{{ devices = [{{ device = "bmc-{host}" }}] }}'
            if host in spec.pdu_only_hosts:
                levels = f'{{ devices = [{{ device = "pdu-1", port = "{n}" }}] }}'
            elif host in spec.pdu_hosts:
                levels += f', {{ devices = [{{ device = "pdu-1", port = "{n}" }}] }}'
        else:
            levels = f'{{ devices = [{{ device = "lab-power", port = "{host}" }}] }}'
        if host in spec.watchdog_hosts:
            levels += ', { devices = [{ device = "sbd" }] }'
        lines += [
            "[[hosts]]",
            f'name = "{host}"',
            f"memory_mb = {spec.host_memory_mb}",
            "vcpus = 64",
            f"levels = [{levels}]",
            *(['watchdog = "sim"'] if host in spec.watchdog_hosts else []),
            "",
        ]
    n = 0
    for host in spec.host_names():
        count = spec.vms_per_host + spec.extra_vms.get(host, 0)
        for i in range(count):
            n += 1
            ha = i >= spec.vms_per_host or n % spec.non_ha_every != 0
            lines += [
                "[[vms]]",
                f'name = "vm-{n:03d}"',
                f'host = "{host}"',
                f"memory_mb = {spec.vm_memory_mb}",
                "vcpus = 2",
                f"ha = {'true' if ha else 'false'}",
                f'priority = "{("high", "medium", "low")[n % 3] if spec.mixed_priorities else "medium"}"',
                "",
            ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Record:
    at: float
    subject: str
    data: bytes
    headers: dict[str, str]

    def decode(self) -> msgspec.Struct | None:
        try:
            return Decoders.any.decode(self.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None


class Observer:
    """Records every message under the prefix, as the NATS CLI's `nats sub 'hafence.>'` would."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.nc: NatsClient | None = None
        self.changed = asyncio.Event()

    async def start(self, url: str, prefix: str = "hafence", user: str = "", password: str = "") -> None:
        # An identity reads replies only under its own inbox prefix (natsconf).
        auth = {"user": user, "password": password, "inbox_prefix": natsconf.inbox_prefix(user)} if user else {}
        # A cluster's URLs come comma-separated, as in [nats] url.
        self.nc = await nats.connect(servers=[u.strip() for u in url.split(",")], name="hafence-lab-observer",
                                     reconnect_time_wait=0.5, max_reconnect_attempts=-1, **auth)

        async def cb(msg: Msg) -> None:
            self.records.append(Record(time.time(), msg.subject, msg.data, dict(msg.headers or {})))
            self.changed.set()

        await self.nc.subscribe(f"{prefix}.>", cb=cb)

    async def stop(self) -> None:
        if self.nc and not self.nc.is_closed:
            await self.nc.close()

    def matching(self, part: str) -> list[Record]:
        return [r for r in self.records if part in r.subject]

    async def wait_for(self, predicate: object, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if predicate():  # type: ignore[operator]
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 0.2))
            except TimeoutError:
                pass


class Lab:
    def __init__(self, spec: LabSpec | None = None, base_dir: str | None = None, keep: bool = False) -> None:
        self.spec = spec or LabSpec()
        self._tmp = None if base_dir else tempfile.TemporaryDirectory(prefix="hafence-lab-")
        self.dir = Path(base_dir or self._tmp.name)  # type: ignore[union-attr]
        self.keep = keep
        self.netns: NetNamespace | None = None
        self.nats = NatsServer(self.dir / "nats")
        # LabSpec.nats_cluster > 1: the nodes of a NATS cluster, in place of self.nats.
        self.nats_cluster: NatsCluster | None = None
        self.config_path = self.dir / "cluster.toml"
        self.trace_file = self.dir / "spans.jsonl"
        self.services: dict[str, Service] = {}
        self.observer = Observer()
        self.config: ClusterConfig | None = None
        self.peers: list[Peer] = []
        self.metrics_ports: dict[str, int] = {}
        self.nats_passwords: dict[str, str] = {}

    @property
    def log_dir(self) -> Path:
        return self.dir / "logs"

    def service_env(self) -> dict[str, str]:
        return {
            "HAFENCE_TRACE_EXPORTER": "jsonl",
            "HAFENCE_TRACE_ENDPOINT": str(self.trace_file),
            "PYTHONUNBUFFERED": "1",
        }

    async def start(self, services: tuple[str, ...] = SERVICES) -> Lab:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.spec.netns_host:
            self.netns = netns.create("lab", 1)
            # NATS listens on the root end of the veth: a local address every lab process reaches.
            self.nats = NatsServer(self.dir / "nats", host=self.netns.host_ip)
        if self.spec.nats_cluster > 1:
            self.nats_cluster = NatsCluster(self.dir / "nats-cluster", self.spec.nats_cluster, host=self.nats.host)
        ports = self.start_power_devices() if self.spec.power == "ipmi" else None
        text = render_config(self.spec, self.nats_url, self.dir, ports)
        self.config_path.write_text(text)
        self.config = parse_config(text, str(self.config_path))
        if self.spec.watchdog_hosts:
            self.start_watchdogs()
        if self.spec.secure:
            self.nats.config_file = str(self.write_nats_conf())
        if self.nats_cluster is not None:
            await self.start_nats_cluster()
        else:
            self.nats.start()
        observer_auth = ("operator", self.nats_passwords["operator"]) if self.spec.secure else ("", "")
        await self.observer.start(self.nats_url, user=observer_auth[0], password=observer_auth[1])
        await self.provision()
        if self.nats_cluster is not None:
            await self.wait_stream_leaders()
        for name in services:
            self.start_service(name)
            if name == "fencer":
                for n in range(2, self.spec.fencer_replicas + 1):
                    self.start_fencer_replica(n)
        for host in self.spec.host_names():
            self.start_agent(host)
        return self

    @property
    def nats_url(self) -> str:
        """What every process is given: one URL, or every node's, comma-separated."""
        return self.nats_cluster.urls if self.nats_cluster is not None else self.nats.url

    async def start_nats_cluster(self, timeout: float = 30.0) -> None:
        """Start the nodes and wait for JetStream's meta leader (provisioning needs one)."""
        cluster = self.nats_cluster
        assert cluster is not None and self.config is not None
        if self.spec.secure:
            config, passwords = self.config, self.nats_passwords

            def secure_conf(port: int, http_port: int, store_dir: str) -> str:
                return natsconf.render(config, passwords, store_dir=store_dir, port=port, http_port=http_port)

            cluster.base_conf = secure_conf
        cluster.start()
        await cluster.wait_meta_leader(timeout)

    async def wait_stream_leaders(self, timeout: float = 30.0) -> dict[str, str]:
        """Every stream, the bucket and the fencer's consumer led and replicated (a
        service that starts earlier only logs errors until then); stream -> leader node."""
        assert self.config is not None
        names = StreamNames.for_prefix(self.config.cluster.subject_prefix)
        auth: dict[str, str] = {}
        if self.spec.secure:
            auth = {"user": "provisioner", "password": self.nats_passwords["provisioner"],
                    "inbox_prefix": natsconf.inbox_prefix("provisioner")}
        nc = await nats.connect(servers=self.nats_url.split(","), name="hafence-lab-readiness", **auth)
        try:
            return await wait_stream_leaders(
                nc.jetstream(), [names.events, names.fence_requests, names.dlq, f"KV_{names.leases}",
                                  f"KV_{fencer_locks_bucket(names)}", f"KV_{fencer_state_bucket(names)}"],
                self.spec.nats_cluster, consumers=((names.fence_requests, "fencer"),), timeout=timeout)
        finally:
            await nc.close()

    async def provision(self) -> None:
        """``hafence deploy provision`` as the provisioner identity: the services
        only check that their streams, consumer and bucket exist."""
        import os
        import sys

        env = {**os.environ, **self.identity("provisioner")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hafence.cli", "deploy", "provision", "--config", str(self.config_path),
            "--wait", "10", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        (self.log_dir / "provision.log").write_bytes(out)
        if proc.returncode != 0:
            raise RuntimeError(f"hafence deploy provision failed ({proc.returncode}): {out.decode(errors='replace')}")

    def write_nats_conf(self) -> Path:
        """Per-service NATS users with the deploy's permissions, passwords in files."""
        assert self.config is not None
        users = natsconf.permissions(self.config)
        secrets = self.dir / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        self.nats_passwords = {user: secrets_token() for user in users}
        for user, password in self.nats_passwords.items():
            path = secrets / f"nats-{user}"
            path.write_text(password + "\n")
            path.chmod(0o600)
        conf = self.dir / "nats.conf"
        conf.write_text(natsconf.render(self.config, self.nats_passwords, store_dir=str(self.dir / "nats" / "js"),
                                        port=self.nats.port, http_port=free_port()))
        return conf

    def identity(self, user: str) -> dict[str, str]:
        if not self.spec.secure:
            return {}
        return {"HAFENCE_NATS_USER": user, "HAFENCE_NATS_PASSWORD_FILE": str(self.dir / "secrets" / f"nats-{user}")}

    def start_power_devices(self) -> LabPorts:
        """A simulated BMC per host (IPMI) and one APC PDU (SNMP), secrets in files."""
        secrets = self.dir / "secrets"
        secrets.mkdir(parents=True, exist_ok=True)
        password, community = secrets / "bmc-password", secrets / "pdu-community"
        password.write_text(secrets_token() + "\n")
        community.write_text(secrets_token() + "\n")
        for f in (password, community):
            f.chmod(0o600)
        hosts = self.spec.host_names()
        ports = LabPorts({h: free_udp_port() for h in hosts}, free_udp_port())
        power = self.dir / "power"
        live = {h: p for h, p in ports.bmcs.items() if h not in self.spec.dead_bmcs}  # dead: nothing answers
        self.peers.append(bmc_sim(self.log_dir, power, password, live, off_delay=self.spec.off_delay_s,
                                  stuck_on=self.spec.stuck_bmcs).start())
        outlets = {n: h for n, h in enumerate(hosts, start=1)}
        self.peers.append(pdu_sim(self.log_dir, power, community, ports.pdu, outlets,
                                  off_delay=self.spec.off_delay_s, op_log=self.pdu_op_log).start())
        return ports

    @property
    def watchdog_dir(self) -> Path:
        return self.dir / "watchdog"

    def start_watchdogs(self) -> None:
        """The simulated watchdog chips of the watchdog hosts (one process), and the slots."""
        (self.dir / "storage" / "slots").mkdir(parents=True, exist_ok=True)
        self.peers.append(Peer("hafence.lab.watchdogsim", ["--dir", str(self.watchdog_dir), "--power-dir",
                                                           str(self.dir / "power")], self.log_dir,
                               "watchdogsim").start())

    def power_loss(self, host: str) -> None:
        """The host loses power (and, for a host in ``dead_bmcs``, its BMC with it)."""
        from hafence.lab.power import SimPowerSwitch

        SimPowerSwitch(self.dir / "power").switch(host, "off", 0.0)

    @property
    def pdu_op_log(self) -> Path:
        return self.dir / "pdu-ops.jsonl"

    def pdu_ops(self) -> list[dict[str, object]]:
        """The PDU's outlet commands so far (pdusim --op-log), with their overlaps."""
        try:
            return [json.loads(line) for line in self.pdu_op_log.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def start_fencer_replica(self, n: int) -> Service:
        """Another fencer process, "fencer-N": the same cluster file but a store
        directory of its own (a replica's journal is its own, as on another machine)."""
        path = self.dir / f"cluster-fencer-{n}.toml"
        path.write_text(self.config_path.read_text().replace(
            f'dir = "{self.dir / "state"}"', f'dir = "{self.dir / f"state-fencer-{n}"}"'))
        return self.start_service("fencer", instance=f"fencer-{n}", config_path=path)

    def start_service(self, name: str, instance: str = "", env: dict[str, str] | None = None,
                      config_path: Path | None = None, module: str = "") -> Service:
        """``module``: run the service through another entry point that binds lab ports
        (e.g. ``hafence.lab.stale_arbiter``); it keeps the service's name and identity."""
        key = instance or name
        args = ["-m", module or f"hafence.{name}", "--config", str(config_path or self.config_path), "--instance", key]
        self.metrics_ports[key] = free_port()
        metrics_env = {"HAFENCE_METRICS_PORT": str(self.metrics_ports[key]), "HAFENCE_METRICS_ADDRESS": "127.0.0.1"}
        env = {**self.service_env(), **metrics_env, **self.identity(name), **(env or {})}
        svc = Service(key, args, self.log_dir, env).start()
        self.services[key] = svc
        return svc

    def start_agent(self, host: str) -> Service:
        args = [
            "-m", "hafence.agent", "--config", str(self.config_path), "--host", host,
            "--sim-power", str(self.dir / "power"), "--boot-vms", "--instance", f"agent-{host}",
            *(["--fail-starts"] if host in self.spec.fail_start_hosts else []),
            *(["--start-delay", str(self.spec.slow_start_hosts[host])] if host in self.spec.slow_start_hosts else []),
            *(["--sim-watchdog", str(self.watchdog_dir)] if host in self.spec.watchdog_hosts else []),
        ]
        prefix = self.netns.exec_prefix() if self.netns and host == self.spec.netns_host else []
        # Agents serve /metrics too (a network-namespaced agent's port is reachable only inside it).
        self.metrics_ports[f"agent-{host}"] = free_port()
        metrics_env = {"HAFENCE_METRICS_PORT": str(self.metrics_ports[f"agent-{host}"]),
                       "HAFENCE_METRICS_ADDRESS": "127.0.0.1"}
        env = {**self.service_env(), **metrics_env, **self.identity(f"agent-{host}")}
        svc = Service(f"agent-{host}", args, self.log_dir, env, prefix=prefix).start()
        self.services[f"agent-{host}"] = svc
        return svc

    async def lease_holder(self, role: str) -> str:
        assert self.observer.nc is not None
        try:
            kv = await self.observer.nc.jetstream().key_value("HAFENCE_leases")
            entry = await kv.get(role)
        except Exception:
            return ""
        return str(json.loads(entry.value or b"{}").get("holder", ""))

    def events(self, kind: str, host: str = "") -> list[msgspec.Struct]:
        """Decoded host events of a kind seen so far (``nats sub 'hafence.host.*.KIND'``)."""
        out = []
        for r in self.observer.records:
            parts = r.subject.split(".")
            if len(parts) == 4 and parts[1] == "host" and parts[3] == kind and (not host or parts[2] == host):
                msg = r.decode()
                if msg is not None:
                    out.append(msg)
        return out

    def latest_inventories(self) -> dict[str, Inventory]:
        latest: dict[str, Inventory] = {}
        for r in self.observer.records:
            msg = r.decode()
            if isinstance(msg, Inventory):
                latest[msg.host] = msg
        return latest

    def fence_results(self, host: str = "") -> list[msgspec.Struct]:
        return [m for r in self.observer.records if ".fence.result." in r.subject
                and (m := r.decode()) is not None and (not host or r.subject.endswith(f".{host}"))]

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Every host heartbeating, every inventory in, every leader elected, and
        the arbiter past its start-up grace."""
        hosts = set(self.spec.host_names())

        def ready() -> bool:
            inv = {r.subject.rsplit(".", 1)[1] for r in self.observer.matching(".inventory.")}
            return hosts <= inv

        if not await self.observer.wait_for(ready, timeout):
            raise RuntimeError(f"lab not ready in {timeout}s:\n{self.diagnostics()}")
        assert self.observer.nc is not None
        kv = await self.observer.nc.jetstream().key_value("HAFENCE_leases")
        deadline = time.monotonic() + timeout
        while True:
            try:
                keys = set(await kv.keys())
            except Exception:
                keys = set()
            if {"heartbeat", "arbiter", "scheduler"} <= keys:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"leaders not elected in {timeout}s (have {keys}):\n{self.diagnostics()}")
            await asyncio.sleep(0.1)
        # The arbiter's start-up grace is one detection window.
        await asyncio.sleep(self.spec.heartbeat_interval_s * self.spec.missed_heartbeats + 0.2)

    def crash(self, host: str) -> None:
        """The host hangs: its agent is frozen (SIGSTOP), still 'running' its VMs.
        That is the dangerous case fencing exists for."""
        self.services[f"agent-{host}"].signal(signal.SIGSTOP)

    def resume(self, host: str) -> None:
        self.services[f"agent-{host}"].signal(signal.SIGCONT)

    def partition(self, host: str) -> None:
        """Cut the host's network; it keeps running (and renewing its storage lease)."""
        if self.netns is None or host != self.spec.netns_host:
            raise ValueError(f"{host} has no network of its own in this lab (LabSpec.netns_host)")
        self.netns.partition()

    def spans(self) -> list[dict[str, object]]:
        try:
            return [json.loads(line) for line in self.trace_file.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def diagnostics(self) -> str:
        out = []
        for name, svc in self.services.items():
            state = "running" if svc.alive() else f"exited {svc.proc.returncode if svc.proc else '?'}"
            out.append(f"--- {name} ({state}) ---\n{svc.tail(12)}")
        return "\n".join(out)

    async def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        await self.observer.stop()
        for svc in self.services.values():
            svc.signal(signal.SIGCONT)
        for name, svc in self.services.items():
            codes[name] = svc.terminate()
        for peer in self.peers:
            peer.stop()
        self.nats.stop()
        if self.nats_cluster is not None:
            self.nats_cluster.stop()
        if self.netns is not None:
            self.netns.destroy()
        if self._tmp and not self.keep:
            self._tmp.cleanup()
        return codes

    async def __aenter__(self) -> Lab:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
