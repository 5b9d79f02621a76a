"""deploy's NATS permissions, on a real nats-server: what each identity must be
able to do (its job), what it must NOT do (publish, subscribe, JetStream API),
and a whole failover plus every CLI command running under them with no
permissions violation anywhere."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from hafence import natsconf
from hafence.bus import Bus
from hafence.config import ClusterConfig, parse_config
from hafence.contracts import FenceRequest, HostEvent, encode
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done
from hafence.lab.natsserver import NatsServer, find_nats_server, free_port
from hafence.subjects import Subjects
from tests.conftest import eventually

CLUSTER = """
[[hosts]]
name = "h1"
memory_mb = 1024
[[hosts]]
name = "h2"
memory_mb = 1024
"""
EVENTS, REQUESTS, DLQ, KV = "HAFENCE_EVENTS", "HAFENCE_FENCE_REQUESTS", "HAFENCE_DLQ", "KV_HAFENCE_leases"
SERVICES = ("heartbeat", "arbiter", "fencer", "scheduler")
EVERYONE = (*SERVICES, "operator", "provisioner", "agent-h1", "agent-h2")


def test_the_generated_config_is_accepted_by_nats_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(CLUSTER)
    conf = tmp_path / "nats.conf"
    conf.write_text(natsconf.render(config, store_dir=str(tmp_path / "js")))
    for user in natsconf.permissions(config):
        monkeypatch.setenv(natsconf.password_env(user), natsconf.new_password())
    result = subprocess.run([find_nats_server(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_deploy_config_is_the_generated_one_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/nats.conf is generated from deploy/cluster.toml; it must not drift from it."""
    root = Path(__file__).resolve().parents[1]
    config = parse_config((root / "deploy" / "cluster.toml").read_text(), "deploy/cluster.toml")
    text = (root / "deploy" / "nats.conf").read_text()
    assert text == natsconf.render(config)
    assert "sync_interval: always" in text  # durability is a stated choice (docs/permissions.md)
    for user in natsconf.permissions(config):
        monkeypatch.setenv(natsconf.password_env(user), natsconf.new_password())
    result = subprocess.run([find_nats_server(), "-t", "-c", str(root / "deploy" / "nats.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_identity_may_read_every_inbox_or_manage_jetstream_but_the_provisioner() -> None:
    """The grants themselves (the behaviour is tested on a server below)."""
    users = natsconf.permissions(parse_config(CLUSTER))
    for user, perms in users.items():
        assert not any(s.startswith("_INBOX.") or s in (">", "_INBOX_>") for s in perms["subscribe"]), user
        assert f"_INBOX_{user}.>" in perms["subscribe"], user
        for grant in perms["publish"]:
            assert grant not in ("$JS.API.>", ">", "$JS.>", "$JS.ACK.>"), (user, grant)
            assert not any(word in grant for word in (".DELETE", ".PURGE")), (user, grant)
            if user != "provisioner":
                assert not any(w in grant for w in ("STREAM.CREATE", "STREAM.UPDATE", "DURABLE")), (user, grant)


@dataclass
class Identity:
    user: str
    nc: NatsClient
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e.lower()]


@dataclass
class Secure:
    server: NatsServer
    config: ClusterConfig
    passwords: dict[str, str]
    identities: list[Identity] = field(default_factory=list)

    async def connect(self, user: str) -> Identity:
        ident = Identity(user, None)  # type: ignore[arg-type]

        async def on_error(err: Exception) -> None:
            ident.errors.append(str(err))

        ident.nc = await nats.connect(self.server.url, user=user, password=self.passwords[user],
                                      inbox_prefix=natsconf.inbox_prefix(user), error_cb=on_error,
                                      max_reconnect_attempts=0, allow_reconnect=False)
        self.identities.append(ident)
        return ident


@pytest.fixture
async def secure(tmp_path: Path) -> AsyncIterator[Secure]:
    conf = tmp_path / "nats.conf"
    server = NatsServer(tmp_path / "nats", config_file=str(conf))
    config = parse_config(f'[nats]\nurl = "{server.url}"\n' + CLUSTER)
    passwords = {user: natsconf.new_password() for user in natsconf.permissions(config)}
    conf.write_text(natsconf.render(config, passwords, store_dir=str(tmp_path / "js"), port=server.port,
                                    http_port=free_port()))
    server.start()
    s = Secure(server, config, passwords)
    try:
        provisioner = await s.connect("provisioner")
        await Bus(provisioner.nc, config, "provisioner").provision()
        yield s
    finally:
        for ident in s.identities:
            await ident.nc.close()
        server.stop()


async def _denied(ident: Identity, subject: str) -> None:
    """Wait until the server has told ``ident`` that ``subject`` is not allowed."""
    await ident.nc.flush()
    try:
        await eventually(lambda: any(subject.lower() in v.lower() for v in ident.violations()), timeout=5)
    except AssertionError:
        raise AssertionError(f"{ident.user}: no violation for {subject}: {ident.errors}") from None


async def _objects_intact(s: Secure) -> None:
    """Nothing a forbidden call could have removed is gone (read back as the provisioner)."""
    js = (await s.connect("provisioner")).nc.jetstream()
    for stream in (EVENTS, REQUESTS, DLQ, KV):
        await js.stream_info(stream)  # raises NotFoundError if deleted
    info = await js.consumer_info(REQUESTS, "fencer")
    assert info.config.durable_name == "fencer"


async def test_each_identity_can_do_its_job(secure: Secure) -> None:
    """What the old config forbade: the scheduler's HA-reservation events,
    alerts, the operator's 'cleared'; and everything through per-identity inboxes."""
    s, subj = secure, Subjects("hafence")
    idents = {u: await s.connect(u) for u in (*SERVICES, "operator", "agent-h1")}
    event = encode(HostEvent(host="h1", kind="alive", at=1.0, reason="test"))
    js = {u: i.nc.jetstream() for u, i in idents.items()}
    await js["scheduler"].publish(subj.host_event("h1", "ha_reservation_lost"), event)
    await js["scheduler"].publish(subj.host_event("h1", "ha_reservation_ok"), event)
    await js["scheduler"].publish(subj.vm_event("vm-a", "started"), event)
    await js["scheduler"].publish(subj.placement_record("r0-00000001"), event)
    for service in SERVICES:
        await js[service].publish(subj.alert("test"), event)
        await js[service].publish(subj.dlq(service), event)
    await js["heartbeat"].publish(subj.host_event("h1", "suspect"), event)
    for kind in ("confirmed_fenced", "maintenance_on", "maintenance_off", "cleared"):
        await js["operator"].publish(subj.host_event("h1", kind), event)
    await js["agent-h1"].publish(subj.inventory("h1"), event)
    await js["agent-h1"].publish(subj.dlq("agent-h1"), event)
    await idents["agent-h1"].nc.publish(subj.hb("h1"), b"{}")
    # Lease holders: the bucket's keys (create, update, read, delete).
    for service in ("heartbeat", "arbiter", "scheduler"):
        kv = await js[service].key_value("HAFENCE_leases")
        revision = await kv.create(service, b"{}")
        await kv.update(service, b'{"term": 1}', last=revision)
        assert (await kv.get(service)).value == b'{"term": 1}'
    # Agents answer their commands; the scheduler reads the reply in its own inbox.
    agent_sub = await idents["agent-h1"].nc.subscribe(subj.agent_cmd("h1"))
    # The subscription is the server's before anyone asks: a request published first
    # finds no one (it failed so in CI, on a quiet machine).
    await idents["agent-h1"].nc.flush()
    asking = asyncio.create_task(idents["scheduler"].nc.request(subj.agent_cmd("h1"), b"ping", timeout=5))
    cmd = await agent_sub.next_msg(timeout=5)
    assert cmd.reply.startswith("_INBOX_scheduler.")
    await cmd.respond(b"pong")
    assert (await asking).data == b"pong"
    # The fencer pulls its durable and acks; the arbiter publishes the request.
    request = FenceRequest(request_id="r1", incident="i1", host="h1", term=1, requested_at=1.0)
    await js["arbiter"].publish(subj.fence_request("h1"), encode(request))
    pull = await js["fencer"].pull_subscribe_bind(durable="fencer", stream=REQUESTS)
    [msg] = await pull.fetch(1, timeout=5)
    await msg.ack_sync()
    await js["fencer"].publish(subj.fence_result("h1"), event)
    # Arbiter, scheduler and the operator (CLI views) replay the events stream.
    for user in ("arbiter", "scheduler", "operator"):
        sub = await js[user].subscribe("hafence.>", stream=EVENTS, ordered_consumer=True)
        await sub.next_msg(timeout=5)
        await sub.consumer_info()
        await sub.unsubscribe()
    # The operator reads who leads, as the lab and `nats kv` do.
    assert "heartbeat" in await (await js["operator"].key_value("HAFENCE_leases")).keys()
    for ident in idents.values():
        await ident.nc.flush()  # the server answers in order: every -ERR is in before the PONG
        assert not ident.violations(), (ident.user, ident.violations())


async def test_an_agent_cannot_publish_for_others_nor_read_their_inboxes(secure: Secure) -> None:
    """A compromised host's agent: no fence results or requests, no host events
    (a forged 'confirmed_fenced'), no other host's heartbeat or inventory, no
    alerts or other dead-letter subjects; no one's inbox but its own (the old
    config let it read `_INBOX.>`, receive the fencer's JetStream delivery of a
    fence request and +TERM it)."""
    s = secure
    watcher, agent = await s.connect("operator"), await s.connect("agent-h1")
    seen: list[str] = []

    async def saw(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    await watcher.nc.subscribe("hafence.>", cb=saw)
    await watcher.nc.flush()  # watching before the agent publishes anything
    forbidden = ["hafence.fence.request.h2", "hafence.fence.result.h2", "hafence.hb.h2", "hafence.inventory.h2",
                 "hafence.host.h2.confirmed_fenced", "hafence.host.h1.cleared", "hafence.host.h2.suspect",
                 "hafence.vm.x.started", "hafence.vm.placements.record.r0-1", "hafence.alert.x",
                 "hafence.dlq.fencer",
                 "hafence.dlq.agent-h2", "hafence.dlq.agent", "hafence.agent.h2.cmd",
                 "$KV.HAFENCE_leases.arbiter", "$JS.API.STREAM.INFO.HAFENCE_EVENTS"]
    for subject in forbidden:
        await agent.nc.publish(subject, b"{}")
    for subject in forbidden:
        await _denied(agent, subject)
    for subject in ("_INBOX.>", "_INBOX_fencer.>", "_INBOX_agent-h2.>", "hafence.agent.h2.cmd", "hafence.>",
                    "hafence.host.h2.cleared", "hafence.host.*.cleared",
                    "$JS.ACK.>"):
        await agent.nc.subscribe(subject)
        await _denied(agent, f'Subscription to "{subject}"')
    await agent.nc.publish("hafence.hb.h1", b"{}")  # its own heartbeat is fine
    await agent.nc.flush()
    await watcher.nc.flush()
    await eventually(lambda: "hafence.hb.h1" in seen)
    assert seen == ["hafence.hb.h1"]


async def test_no_service_operator_or_provisioner_can_delete_purge_or_steal(secure: Secure) -> None:
    """The old config gave every service and the operator `$JS.API.>`: the
    operator deleted the fencer's consumer, purged the events stream and
    deleted the lease bucket. Now nobody may delete or purge, and only the
    provisioner creates or changes streams and durables."""
    s = secure
    destructive = [f"$JS.API.CONSUMER.DELETE.{REQUESTS}.fencer", f"$JS.API.STREAM.PURGE.{EVENTS}",
                   f"$JS.API.STREAM.DELETE.{KV}", f"$JS.API.STREAM.DELETE.{EVENTS}", f"$JS.API.STREAM.PURGE.{DLQ}",
                   f"$JS.API.STREAM.MSG.DELETE.{EVENTS}"]
    management = ["$JS.API.STREAM.CREATE.EVIL", f"$JS.API.STREAM.UPDATE.{EVENTS}",
                  f"$JS.API.CONSUMER.DURABLE.CREATE.{EVENTS}.evil",
                  # A second consumer on the fence requests (a work queue) would take requests from the fencer.
                  f"$JS.API.CONSUMER.CREATE.{REQUESTS}", f"$JS.API.CONSUMER.CREATE.{REQUESTS}.evil"]
    for user in EVERYONE:
        ident = await s.connect(user)
        calls = destructive + (management if user != "provisioner" else [])
        if user != "fencer":  # only the fencer pulls fence requests, and acks them
            calls += [f"$JS.API.CONSUMER.MSG.NEXT.{REQUESTS}.fencer", f"$JS.ACK.{REQUESTS}.fencer.1.1.1.1.0"]
        for subject in calls:
            await ident.nc.publish(subject, b"{}", reply=f"{natsconf.inbox_prefix(user)}.x")
        for subject in calls:
            await _denied(ident, subject)
    await _objects_intact(s)


async def test_a_service_may_create_only_ephemeral_consumers_on_the_events_stream(secure: Secure) -> None:
    """The bare CREATE subject it needs for replay takes no durable name."""
    scheduler = await secure.connect("scheduler")
    body = {"stream_name": EVENTS, "config": {"durable_name": "evil", "ack_policy": "explicit"}}
    reply = await scheduler.nc.request(f"$JS.API.CONSUMER.CREATE.{EVENTS}", json.dumps(body).encode(), timeout=5)
    assert "error" in json.loads(reply.data), reply.data
    provisioner = await secure.connect("provisioner")
    names = [c.name async for c in _consumers(provisioner.nc, EVENTS)]
    assert "evil" not in names


async def _consumers(nc: NatsClient, stream: str) -> AsyncIterator[nats.js.api.ConsumerInfo]:
    for info in await nc.jetstream()._jsm.consumers_info(stream):
        yield info


async def test_services_write_only_their_own_dead_letter_subject(secure: Secure) -> None:
    for user in SERVICES:
        ident = await secure.connect(user)
        others = [f"hafence.dlq.{o}" for o in (*SERVICES, "agent", "agent-h1") if o != user]
        for subject in others:
            await ident.nc.publish(subject, b"{}")
        for subject in others:
            await _denied(ident, subject)


async def test_a_wrong_password_is_refused(secure: Secure) -> None:
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure.server.url, user="agent-h1", password="wrong", connect_timeout=2,
                           max_reconnect_attempts=0, allow_reconnect=False)


def _violations(lab: Lab) -> list[str]:
    found = []
    for path in [lab.dir / "nats" / "nats-server.log", *lab.log_dir.iterdir()]:
        for line in path.read_text(errors="replace").splitlines():
            if "permissions violation" in line.lower():
                found.append(f"{path.name}: {line}")
    return found


@pytest.mark.e2e
@pytest.mark.timeout(180)
async def test_a_whole_failover_and_every_cli_command_run_under_the_deploy_permissions() -> None:
    """Under the generated config: services, agents, the provisioner and every
    CLI command. Any "Permissions Violation" in any service's or nats-server's
    log fails it (the old config: the scheduler's ha_reservation events)."""
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, secure=True))
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        expected = {vm.name for vm in lab.config.vms_of("lab-2") if vm.ha}
        lab.crash("lab-2")
        assert await lab.observer.wait_for(lambda: failover_done(lab, "lab-2", expected), 30), lab.diagnostics()
        # The scheduler's verdict on the HA reservation got out (the old config denied it).
        assert await lab.observer.wait_for(
            lambda: lab.observer.matching(".ha_reservation_"), 10), lab.diagnostics()
        env = {**os.environ, **lab.identity("operator")}
        cfg = str(lab.config_path)
        commands = [
            ["status", "--config", cfg], ["hosts", "--config", cfg], ["vms", "--config", cfg],
            ["events", "--config", cfg], ["hosts", "--config", cfg, "--json"],
            ["confirm-fenced", "lab-2", "--config", cfg, "--yes", "--reason", "checked the PDU"],
            ["maintenance", "lab-3", "on", "--config", cfg, "--reason", "test"],
            ["maintenance", "lab-3", "off", "--config", cfg],
            ["fence", "status", "lab-1", "--config", cfg],
        ]
        if _has_command("host"):  # `hafence host clear` (S6), where it exists
            commands.append(["host", "clear", "lab-2", "--config", cfg, "--reason", "checked: runs nothing"])
        for command in commands:
            result = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "hafence.cli", *command], env=env, capture_output=True,
                text=True, timeout=60)
            assert "iolation" not in result.stdout + result.stderr, (command, result.stdout, result.stderr)
            assert result.returncode in (0, 1), (command, result.returncode, result.stdout, result.stderr)
        for kind in ("confirmed_fenced", "maintenance_on", "maintenance_off"):
            assert await lab.observer.wait_for(lambda k=kind: lab.observer.matching(f".{k}"), 10), kind
        await asyncio.sleep(lab.spec.heartbeat_interval_s * 3)  # late -ERRs of the last actions
        assert not _violations(lab), "\n".join(_violations(lab))
    finally:
        await lab.stop()


def _has_command(name: str) -> bool:
    result = subprocess.run([sys.executable, "-m", "hafence.cli", name, "--help"], capture_output=True, text=True,
                            timeout=30)
    return result.returncode == 0
