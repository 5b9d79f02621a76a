"""The NATS server configuration for a cluster: one user per service, per agent
host, for the operator and for the provisioner, each allowed only what its job
needs (docs/permissions.md has the table and the reasons).

* only the arbiter may publish fence requests, only the fencer fence results;
* an agent may publish only its own host's heartbeats, inventory and dead
  letters, subscribe only to its own commands, and answer them;
* every identity reads replies only under its own inbox prefix
  (``_INBOX_<user>.>``, nats-py's ``inbox_prefix``): nobody sees another's
  JetStream acks, deliveries or request replies;
* only the provisioner manages streams, consumers and the lease bucket; the
  services get the few JetStream API subjects they use (stream info, an
  ephemeral ordered consumer on the events stream, the fencer's pull on its own
  durable, the lease bucket's keys), never a delete or a purge;
* JetStream writes are synced to disk before they are acknowledged
  (``sync_interval: always``): an acknowledged fence request or result survives
  a power loss of the NATS host.

Passwords are not in the file: each user's is ``$HAFENCE_NATS_PW_<USER>`` (the
NATS server reads it from its environment), or given inline (quoted) for a lab.
Generated passwords use an alphabet nats-server can never read as anything but
a string (see ``new_password``).
"""

from __future__ import annotations

import re
import secrets
import string

from hafence.bus.connection import inbox_prefix
from hafence.bus.names import StreamNames
from hafence.bus.provision import fencer_locks_bucket, fencer_state_bucket
from hafence.config import ClusterConfig
from hafence.slots import view_subject, views_subject
from hafence.subjects import Subjects

API = "$JS.API"
SERVICES = ("heartbeat", "arbiter", "fencer", "scheduler")
OPERATOR, PROVISIONER = "operator", "provisioner"
# The durable consumer the provisioner creates for the fencer, and the only one
# the fencer may pull from and ack on.
FENCER_DURABLE = "fencer"
# What a deployment syncs: "always" (fsync each write before the ack) or a duration.
DEFAULT_SYNC = "always"


def _user_env(user: str) -> str:
    return "HAFENCE_NATS_PW_" + re.sub(r"[^A-Z0-9]", "_", user.upper())


def password_env(user: str) -> str:
    return _user_env(user)


# nats-server's config lexer reads an unquoted value by its first characters:
# digits (or '-' and digits) make a number, a date or a size, and an
# environment variable's value is lexed the same way. A letter first, then
# letters and digits only, is always a string (no word of 32 characters is a
# boolean keyword).
_FIRST = string.ascii_letters
_REST = string.ascii_letters + string.digits
PASSWORD_LENGTH = 32  # ~190 bits


def new_password() -> str:
    return secrets.choice(_FIRST) + "".join(secrets.choice(_REST) for _ in range(PASSWORD_LENGTH - 1))


def is_safe_password(value: str) -> bool:
    return (len(value) >= 16 and value[0] in _FIRST and all(c in _REST for c in value)
            and value.lower() not in ("true", "false", "yes", "no", "on", "off"))


def _stream_reader(stream: str) -> list[str]:
    """Replay a stream with an ordered consumer: look it up, create an ephemeral
    consumer (the bare CREATE subject takes no durable name), ask its info and
    answer flow control."""
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.CONSUMER.CREATE.{stream}",
            f"{API}.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>"]


def _kv_reader(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    return [f"{API}.STREAM.INFO.{stream}", f"{API}.DIRECT.GET.{stream}", f"{API}.DIRECT.GET.{stream}.>",
            f"{API}.STREAM.MSG.GET.{stream}"]


def _kv_writer(bucket: str) -> list[str]:
    # Bucket level: a lease holder creates, updates and deletes its keys (and may
    # keep others, e.g. the highest term, in the same bucket).
    return [*_kv_reader(bucket), f"$KV.{bucket}.>"]


def _provisioner() -> list[str]:
    """Create and update, never delete or purge: removing data stays a human act
    (the NATS CLI with an account that has the rights)."""
    return [f"{API}.INFO", f"{API}.STREAM.NAMES", f"{API}.STREAM.LIST", f"{API}.STREAM.INFO.*",
            f"{API}.STREAM.CREATE.*", f"{API}.STREAM.UPDATE.*", f"{API}.CONSUMER.INFO.*.*",
            f"{API}.CONSUMER.LIST.*", f"{API}.CONSUMER.NAMES.*",
            f"{API}.CONSUMER.CREATE.*.*", f"{API}.CONSUMER.CREATE.*.*.>", f"{API}.CONSUMER.DURABLE.CREATE.*.*"]


def permissions(config: ClusterConfig) -> dict[str, dict[str, list[str]]]:
    s = Subjects(config.cluster.subject_prefix)
    n = StreamNames.for_prefix(config.cluster.subject_prefix)
    events, dlq_stream = _stream_reader(n.events), [f"{API}.STREAM.INFO.{n.dlq}"]
    alerts = s.alerts()

    def inbox(user: str) -> str:
        return inbox_prefix(user) + ".>"

    def service(name: str, publish: list[str], subscribe: tuple[str, ...] = ()) -> dict[str, list[str]]:
        return {"publish": [*publish, alerts, s.dlq(name), *dlq_stream],
                "subscribe": [*subscribe, inbox(name)]}

    users: dict[str, dict[str, list[str]]] = {
        "heartbeat": service("heartbeat", [
            s.host_events("suspect"), s.host_events("alive"), f"{API}.STREAM.INFO.{n.events}",
            # The view of the hosts it hears, for watchdog self-fencing (docs/watchdog.md).
            views_subject(s),
            *_kv_writer(n.leases)], (s.hb_all(),)),
        "arbiter": service("arbiter", [
            s.fence_requests(), *(s.host_events(k) for k in ("fence_requested", "fence_skipped", "fenced",
                                                              "fence_failed")),
            f"{API}.STREAM.INFO.{n.fence_requests}", *events, *_kv_writer(n.leases)]),
        "fencer": service("fencer", [
            s.fence_results(), s.host_events("protected"), s.host_events("not_protected"),
            f"{API}.STREAM.INFO.{n.fence_requests}", f"{API}.STREAM.INFO.{n.events}",
            f"{API}.CONSUMER.INFO.{n.fence_requests}.{FENCER_DURABLE}",
            f"{API}.CONSUMER.MSG.NEXT.{n.fence_requests}.{FENCER_DURABLE}",
            f"$JS.ACK.{n.fence_requests}.{FENCER_DURABLE}.>",
            # It reads the lease bucket (who leads, the terms), it holds no lease.
            *_kv_reader(n.leases),
            # Replicas share device locks, request claims, the highest term and results.
            *_kv_writer(fencer_locks_bucket(n)), *_kv_writer(fencer_state_bucket(n))],
            # The watchdog level follows the monitor's views (docs/watchdog.md).
            (views_subject(s),)),
        "scheduler": service("scheduler", [
            s.vm_events(), s.placement_records(),
            s.host_events("ha_reservation_ok"), s.host_events("ha_reservation_lost"),
            # The automatic rule clears a host that reports clean (S6).
            s.host_events("cleared"),
            f"{s.prefix}.agent.*.cmd", *events, *_kv_writer(n.leases)]),
        OPERATOR: {
            # The CLI: confirmations, maintenance, clearing a fenced host; reading
            # the bus, the events and dead-letter streams and the lease bucket.
            "publish": [s.host_events("confirmed_fenced"), s.host_events("maintenance_on"),
                        s.host_events("maintenance_off"), s.host_events("cleared"),
                        *events, *_stream_reader(n.dlq), f"{API}.DIRECT.GET.{n.events}",
                        f"{API}.STREAM.MSG.GET.{n.events}", f"{API}.STREAM.MSG.GET.{n.dlq}",
                        *_kv_reader(n.leases), *_stream_reader(f"KV_{n.leases}")[1:]],
            "subscribe": [s.all(), inbox(OPERATOR)],
        },
        PROVISIONER: {"publish": _provisioner(), "subscribe": [inbox(PROVISIONER)]},
    }
    for host in config.hosts:
        user = f"agent-{host.name}"
        users[user] = {
            # Answering commands needs the reply subject (allow_responses), not a grant.
            # All agents share the dead-letter subject "agent": the DLQ stream caps
            # it (messages per subject, discard old), so one agent cannot push
            # another service's dead letters out.
            "publish": [s.hb(host.name), s.inventory(host.name), s.dlq(f"agent-{host.name}")],
            # Its own host's "cleared" ends its quarantine (S6).
            # The monitor's view of it keeps its watchdog fed without storage (docs/watchdog.md).
            "subscribe": [s.agent_cmd(host.name), s.host_event(host.name, "cleared"), view_subject(s, host.name),
                          inbox(user)],
        }
    return users


def _quote(value: str) -> str:
    if '"' in value or "\\" in value or "\n" in value:
        raise ValueError("a NATS password may not contain quotes, backslashes or newlines")
    return f'"{value}"'


def render(config: ClusterConfig, passwords: dict[str, str] | None = None, store_dir: str = "/data/jetstream",
           port: int = 4222, http_port: int = 8222, sync: str = DEFAULT_SYNC) -> str:
    """nats-server configuration text; ``passwords`` inline (a lab), else env references."""
    if not re.fullmatch(r"always|\d+(ms|s|m|h)", sync):
        raise ValueError(f"sync_interval {sync!r}: use 'always' or a duration like 500ms, 1s, 2m")
    lines = [
        "# Generated by `hafence deploy nats-conf`: one user per hafence service, agent host,",
        "# the operator and the provisioner. See docs/permissions.md.",
        f"port: {port}",
        f"http_port: {http_port}",
        "jetstream {",
        f'  store_dir: "{store_dir}"',
        "  # Fsync every write before it is acknowledged: an acked fence request or",
        "  # result survives a power loss of this host (cost: docs/permissions.md).",
        f"  sync_interval: {sync}",
        "}",
        "authorization {",
        "  users = [",
    ]
    for user, perms in permissions(config).items():
        password = _quote(passwords[user]) if passwords else f"${_user_env(user)}"
        pub = ", ".join(f'"{x}"' for x in perms["publish"])
        sub = ", ".join(f'"{x}"' for x in perms["subscribe"])
        responses = "\n        allow_responses: true" if user.startswith("agent-") else ""
        lines += [
            f'    {{ user: "{user}", password: {password}',
            "      permissions: {",
            f"        publish: {{ allow: [{pub}] }}",
            f"        subscribe: {{ allow: [{sub}] }}{responses}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}", ""]
    return "\n".join(lines)
