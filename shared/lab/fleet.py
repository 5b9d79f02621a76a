"""A fleet simulator: one process that plays thousands of hosts over a real nats-server.

``python -m hafence.lab.fleet --config cluster.toml`` plays every host of the
cluster file (or ``--hosts N``: the first N) the way their agents would, on the
documented subjects:

* heartbeats on ``<prefix>.hb.<host>`` (core NATS), each host once per
  ``--interval`` (default: the configured heartbeat interval), spread evenly
  over the interval. They are written pre-encoded on a raw NATS connection of
  their own (a ``PUB`` frame per heartbeat, one socket write per 10 ms slice):
  the generator must not be what limits a benchmark of the monitor;
* inventories on ``<prefix>.inventory.<host>`` (JetStream): at start, every
  ``inventory_interval_s``, and when a host's VMs change;
* VM commands on ``<prefix>.agent.<host>.cmd``: ``VmStart``/``VmStop`` answered
  with an ``AgentReply`` after ``--start-delay`` seconds (concurrently, like a
  hypervisor starting several domains);
* storage leases ``<lease_dir>/<host>.lease`` when ``[storage] lease_dir`` is set;
* power: with ``--sim-power DIR`` a host whose simulated power reads off is down.

It reads commands on stdin, one per line: ``fail HOST...`` (the hosts hang:
silent, answering nothing, still "running" their VMs: what fencing exists for),
``recover HOST...`` (a new boot), ``stats`` (prints a JSON line), ``quit``. On
exit it prints a JSON line with what it sent.

One NATS identity plays every host (``HAFENCE_NATS_USER``/``..._PASSWORD_FILE``
like the services; it needs the agents' rights for all hosts). The raw
heartbeat connection does not do TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.config import ClusterConfig, load_config, read_secret
from hafence.contracts import AgentReply, Decoders, Inventory, VmInfo, VmSpec, VmStart, encode
from hafence.lab.power import SimPowerSwitch

SLICE_S = 0.01


def fleet_config(nats_url: str, state_dir: str | os.PathLike[str], hosts: int, vms_per_host: int = 0,
                 heartbeat_interval_s: float = 1.0, missed_heartbeats: int = 3, host_memory_mb: int = 262_144,
                 vm_memory_mb: int = 4096, extra: str = "") -> str:
    """A cluster file for a fleet: hosts ``fleet-00001``..., each fenced through the
    ``sim`` power switch in ``<state_dir>/power`` (port = host name), VMs all HA."""
    state = Path(state_dir)
    lines = [
        f'[nats]\nurl = "{nats_url}"\n',
        f"[timings]\nheartbeat_interval_s = {heartbeat_interval_s}\nmissed_heartbeats = {missed_heartbeats}\n"
        "lease_ttl_s = 3.0\ninventory_interval_s = 30.0\n",
        f'[store]\ndir = "{state / "state"}"\n',
        f'[devices.power]\ndriver = "sim"\nstate_dir = "{state / "power"}"\noff_delay_s = 0.05\n'
        "power_timeout_s = 5.0\n",
        extra,
    ]
    for i in range(1, hosts + 1):
        lines.append(f'[[hosts]]\nname = "fleet-{i:05d}"\nmemory_mb = {host_memory_mb}\nvcpus = 64\n'
                     f'levels = [{{ devices = [{{ device = "power", port = "fleet-{i:05d}" }}] }}]\n')
    for i in range(1, hosts + 1):
        for j in range(vms_per_host):
            lines.append(f'[[vms]]\nname = "vm-{i:05d}-{j:03d}"\nhost = "fleet-{i:05d}"\n'
                         f"memory_mb = {vm_memory_mb}\nvcpus = 2\nha = true\n")
    return "\n".join(lines)


async def provision(config: ClusterConfig) -> None:
    """What ``hafence deploy provision`` does (streams, consumer, bucket), in-process."""
    from hafence.bus import Bus

    bus = await Bus.connect(config, "provisioner")
    try:
        await bus.provision()
    finally:
        await bus.close()


class RawPublisher:
    """A bare NATS client that only publishes: CONNECT, then PUB frames; answers PING."""

    def __init__(self, url: str, user: str = "", password: str = "") -> None:
        self.url, self.user, self.password = url, user, password
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.errors: list[str] = []
        self._pong = asyncio.Event()

    async def connect(self) -> None:
        u = urlparse(self.url.split(",")[0].strip())
        self.reader, self.writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 4222)
        await self.reader.readline()  # INFO
        opts: dict[str, object] = {"verbose": False, "pedantic": False, "name": "hafence-fleet-heartbeats",
                                   "lang": "python-raw", "version": "0", "protocol": 1}
        if self.user:
            opts.update(user=self.user, **{"pass": self.password})
        self.writer.write(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
        await self.writer.drain()
        line = await asyncio.wait_for(self.reader.readline(), 5)
        if not line.startswith(b"PONG"):
            raise ConnectionError(f"NATS refused the fleet's heartbeat connection: {line.decode().strip()}")

    async def serve_pings(self) -> None:
        assert self.reader is not None and self.writer is not None
        while line := await self.reader.readline():
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                self.errors.append(line.decode().strip())
                print(f"fleet: heartbeat connection: {line.decode().strip()}", file=sys.stderr, flush=True)

    async def write(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Fleet:
    def __init__(self, config: ClusterConfig, hosts: list[str] | None = None, interval_s: float | None = None,
                 start_delay_s: float = 0.0, power_dir: str = "", heartbeats_only: bool = False) -> None:
        self.config = config
        self.hosts = hosts if hosts is not None else [h.name for h in config.hosts]
        self.interval_s = interval_s or config.timings.heartbeat_interval_s
        self.start_delay_s = start_delay_s
        self.power = SimPowerSwitch(power_dir) if power_dir else None
        self.heartbeats_only = heartbeats_only
        self.prefix = config.cluster.subject_prefix
        self.boot = {h: uuid.uuid4().hex for h in self.hosts}
        self.vms: dict[str, dict[str, VmSpec]] = {h: {} for h in self.hosts}
        for vm in config.vms:
            if vm.host in self.vms:
                self.vms[vm.host][vm.name] = vm.spec()
        self.failed: set[str] = set()
        self.powered_off: set[str] = set()
        self.sent = 0
        self.started = 0
        self.dirty: set[str] = set(self.hosts)
        self.nc: NatsClient | None = None
        self._frames = {h: self._frame_parts(h) for h in self.hosts}
        self._host_configs = {h.name: h for h in config.hosts}

    def _frame_parts(self, host: str) -> tuple[bytes, bytes]:
        head = f"PUB {self.prefix}.hb.{host} ".encode()
        body = f'{{"type":"heartbeat","v":1,"host":"{host}","boot_id":"{self.boot[host]}","seq":'.encode()
        return head, body

    def down(self, host: str) -> bool:
        return host in self.failed or host in self.powered_off

    # --- heartbeats -------------------------------------------------------------

    async def heartbeats(self, raw: RawPublisher) -> None:
        hosts, frames = self.hosts, self._frames
        per_slice = max(1, round(len(hosts) * SLICE_S / self.interval_s))
        slice_s = self.interval_s * per_slice / len(hosts)
        seq, i, t0, slices = 1, 0, time.monotonic(), 0
        while True:
            suffix = b'%d,"sent_at":%.6f}' % (seq, time.time())
            parts = []
            for _ in range(per_slice):
                host = hosts[i]
                if not self.down(host):
                    head, body = frames[host]
                    parts.append(b"%s%d\r\n%s%s\r\n" % (head, len(body) + len(suffix), body, suffix))
                i += 1
                if i == len(hosts):
                    i, seq = 0, seq + 1
                    suffix = b'%d,"sent_at":%.6f}' % (seq, time.time())
            if parts:
                await raw.write(b"".join(parts))
                self.sent += len(parts)
            slices += 1
            delay = t0 + slices * slice_s - time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    # --- inventories, commands, storage, power ----------------------------------

    def inventory(self, host: str) -> Inventory:
        cfg = self._host_configs[host]
        return Inventory(host=host, boot_id=self.boot[host], memory_mb=cfg.memory_mb, vcpus=cfg.vcpus,
                         labels=cfg.labels, vms=[VmInfo(spec=s, state="running") for s in self.vms[host].values()],
                         sent_at=time.time(), listed_at=time.monotonic())

    async def inventories(self) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        # Every host again each inventory_interval_s, spread over the interval as
        # independent agents would be (the start-up round is all at once).
        every = self.config.timings.inventory_interval_s
        per_tick = max(1, round(len(self.hosts) * 0.1 / every))
        turn = 0
        while True:
            for _ in range(per_tick):
                self.dirty.add(self.hosts[turn])
                turn = (turn + 1) % len(self.hosts)
            batch = [h for h in self.dirty if not self.down(h)]
            self.dirty.clear()
            for k in range(0, len(batch), 200):
                results = await asyncio.gather(
                    *(js.publish(f"{self.prefix}.inventory.{h}", encode(self.inventory(h)), timeout=10)
                      for h in batch[k:k + 200]), return_exceptions=True)
                for h, r in zip(batch[k:k + 200], results, strict=True):
                    if isinstance(r, BaseException):
                        self.dirty.add(h)  # the stream may not be there yet: next round
            await asyncio.sleep(0.1)

    async def on_command(self, msg: Msg) -> None:
        host = msg.subject.split(".")[-2]
        if host not in self.vms or self.down(host) or not msg.reply:
            return  # not ours, or a hung host: it answers nothing
        try:
            cmd = Decoders.agent_command.decode(msg.data)
        except Exception as err:
            await msg.respond(json.dumps({"type": "error", "v": 1, "error": f"undecodable message: {err}"}).encode())
            return
        if self.start_delay_s:
            await asyncio.sleep(self.start_delay_s)
        if self.down(host):
            return
        if isinstance(cmd, VmStart):
            name, already = cmd.vm.name, cmd.vm.name in self.vms[host]
            self.vms[host][name] = cmd.vm
            self.started += not already
            reply = AgentReply(host=host, vm=name, ok=True, state="running", already=already)
        else:
            name = cmd.vm
            self.vms[host].pop(name, None)
            reply = AgentReply(host=host, vm=name, ok=True, state="stopped")
        self.dirty.add(host)
        await msg.respond(encode(reply))

    async def commands(self) -> None:
        assert self.nc is not None

        async def cb(msg: Msg) -> None:
            # Concurrent, like a hypervisor starting several domains at once.
            asyncio.get_running_loop().create_task(self.on_command(msg))

        await self.nc.subscribe(f"{self.prefix}.agent.*.cmd", cb=cb)

    async def storage_leases(self) -> None:
        settings = self.config.storage
        lease_dir = Path(settings.lease_dir)

        def renew() -> None:
            lease_dir.mkdir(parents=True, exist_ok=True)
            for h in self.hosts:
                if not self.down(h):
                    (lease_dir / f"{h}.lease").write_text(f"{self.boot[h]} {time.time():.3f}\n")

        while True:
            await asyncio.to_thread(renew)
            await asyncio.sleep(settings.renew_interval_s)

    async def watch_power(self) -> None:
        assert self.power is not None
        power = self.power
        while True:
            off = await asyncio.to_thread(lambda: {h for h in self.hosts if power.read(h) == "off"})
            for h in self.powered_off - off:
                self.recover(h)  # powered on again: a new boot, with no VMs (they were killed)
                self.vms[h].clear()
            self.powered_off = off
            await asyncio.sleep(self.interval_s)

    # --- control ----------------------------------------------------------------

    def fail(self, host: str) -> None:
        self.failed.add(host)

    def recover(self, host: str) -> None:
        self.failed.discard(host)
        self.boot[host] = uuid.uuid4().hex
        self._frames[host] = self._frame_parts(host)
        self.dirty.add(host)

    def stats(self) -> dict[str, object]:
        return {"hosts": len(self.hosts), "sent": self.sent, "failed": sorted(self.failed),
                "vm_starts": self.started, "running_vms": sum(len(v) for v in self.vms.values())}

    async def control(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except (OSError, ValueError):
            return  # stdin is a file or /dev/null: no commands, run until stopped
        while True:
            line = (await reader.readline()).decode()
            if not line:
                return  # stdin closed: run until stopped
            words = line.split()
            if not words:
                continue
            match words[0]:
                case "fail":
                    for h in words[1:]:
                        self.fail(h)
                case "recover":
                    for h in words[1:]:
                        self.recover(h)
                case "stats":
                    print(json.dumps(self.stats()), flush=True)
                case "quit":
                    stop.set()
                    return

    async def run(self, stop: asyncio.Event, control: bool = True) -> None:
        settings = self.config.nats
        user = os.environ.get("HAFENCE_NATS_USER", settings.user)
        password = read_secret(os.environ.get("HAFENCE_NATS_PASSWORD_FILE", settings.password_file),
                               settings.password_env, "nats.password") if user else ""
        raw = RawPublisher(settings.url, user, password)
        await raw.connect()
        self.nc = await nats.connect(settings.url, name="hafence-fleet", **({"user": user, "password": password}
                                                                            if user else {}))
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(raw.serve_pings()), tg.create_task(self.heartbeats(raw))]
                if not self.heartbeats_only:
                    tasks.append(tg.create_task(self.inventories()))
                    await self.commands()
                if self.config.storage.lease_dir and not self.heartbeats_only:
                    tasks.append(tg.create_task(self.storage_leases()))
                if self.power is not None:
                    tasks.append(tg.create_task(self.watch_power()))
                if control:
                    tasks.append(tg.create_task(self.control(stop)))
                await stop.wait()
                for t in tasks:
                    t.cancel()
        finally:
            raw.close()
            await self.nc.close()


class FleetProcess:
    """The fleet simulator as a child process, driven through its stdin (tests, benchmarks)."""

    def __init__(self, config_path: str | os.PathLike[str], log_dir: str | os.PathLike[str], *args: str,
                 prefix: list[str] | None = None) -> None:
        import subprocess

        from hafence.lab.procs import die_with_parent

        self.log_path = Path(log_dir) / "fleet.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "hafence.lab.fleet", "--config", str(config_path), *args],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        log.close()

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def fail(self, *hosts: str) -> None:
        self.command("fail " + " ".join(hosts))

    def recover(self, *hosts: str) -> None:
        self.command("recover " + " ".join(hosts))

    def stop(self, timeout: float = 10.0) -> None:
        import subprocess

        if self.proc.poll() is None:
            try:
                self.command("quit")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def tail(self, lines: int = 10) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hafence.lab.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="cluster configuration (TOML): hosts, VMs, NATS, prefix")
    parser.add_argument("--hosts", type=int, default=0, help="play only the first N hosts of the file")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between one host's heartbeats")
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds a VM start takes")
    parser.add_argument("--sim-power", default="", help="simulated power directory (a host reading off is down)")
    parser.add_argument("--heartbeats-only", action="store_true", help="no inventories, commands or leases")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on quit)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    hosts = [h.name for h in config.hosts][: args.hosts or None]
    fleet = Fleet(config, hosts, args.interval or None, args.start_delay, args.sim_power, args.heartbeats_only)

    async def go() -> None:
        stop = asyncio.Event()
        if args.duration:
            asyncio.get_running_loop().call_later(args.duration, stop.set)
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        t0 = time.monotonic()
        await fleet.run(stop)
        print(json.dumps({**fleet.stats(), "seconds": round(time.monotonic() - t0, 3)}), flush=True)

    asyncio.run(go())
    return 0


if __name__ == "__main__":
    sys.exit(main())
