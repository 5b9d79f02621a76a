"""The connection to NATS: one identity per service, reconnect forever once up.

Each identity reads its replies (request replies, JetStream acks, pull
deliveries, ordered-consumer deliveries, KV answers: nats-py takes them all
from ``inbox_prefix``) under a prefix of its own, ``_INBOX_<user>``, and the
generated permissions let it subscribe to that prefix only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from hafence.config import ClusterConfig, read_secret
from hafence.subjects import check_name

log = logging.getLogger("hafence.bus")

# The oldest nats-server hafence runs on: 2.11 reads the subject filter of a
# compare-and-set (``Nats-Expected-Last-Subject-Sequence-Subject``) the scheduler's
# placement records rely on. An older one ignores that header and refuses every
# record but the first (nothing unsafe, but no VM would be restarted).
MIN_SERVER_VERSION = (2, 11)


def too_old(nc: NatsClient) -> str:
    """Why the nats-server ``nc`` is connected to cannot carry hafence, or ''."""
    try:
        server = nc.connected_server_version
        major, minor = server.major, server.minor
        version = f"{major}.{minor}.{server.patch}"
    except ValueError as err:  # not a semantic version
        return f"the nats-server version cannot be read ({err})"
    if (major, minor) < MIN_SERVER_VERSION:
        want = ".".join(map(str, MIN_SERVER_VERSION))
        return (f"nats-server {version} is too old: hafence needs {want} or later "
                "(the scheduler's placement records: a compare-and-set over a subject filter)")
    return ""


def inbox_prefix(identity: str) -> str:
    """The reply-subject prefix of one identity; its permissions allow ``<prefix>.>`` only."""
    return "_INBOX_" + check_name("NATS identity", identity)


async def open_connection(config: ClusterConfig, service: str, connect_timeout: float = 5.0) -> NatsClient:
    settings = config.nats
    # One cluster file serves every service; each has its own NATS identity.
    user = os.environ.get("HAFENCE_NATS_USER", settings.user)
    password_file = os.environ.get("HAFENCE_NATS_PASSWORD_FILE", settings.password_file)
    # The compose file's 3-node profile points every container at all three servers.
    url = os.environ.get("HAFENCE_NATS_URL") or settings.url
    options: dict[str, Any] = {
        "servers": [u.strip() for u in url.split(",")],
        "name": f"hafence-{service}",
        # Without a user (a lab with no auth, a creds file) the service name keeps
        # replies apart all the same.
        "inbox_prefix": inbox_prefix(user or service),
        "connect_timeout": connect_timeout,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
    }
    if user:
        options["user"] = user
        options["password"] = read_secret(password_file, settings.password_env, "nats.password")
    if settings.creds_file:
        options["user_credentials"] = settings.creds_file
    if settings.tls_ca_file or settings.tls_cert_file:
        ctx = ssl.create_default_context(cafile=settings.tls_ca_file or None)
        if settings.tls_cert_file:
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
        options["tls"] = ctx

    holder: list[NatsClient] = []

    async def on_disconnect() -> None:
        if holder and not (holder[0].is_closed or holder[0].is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnect() -> None:
        log.info("reconnected to NATS")

    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err) or type(err).__name__)
        if holder:  # before the first connection, the caller reports it
            log.warning("NATS error: %s", err)

    options.update(disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, error_cb=on_error)
    try:
        # nats-py retries the first connection forever when reconnecting is on;
        # bound it, so a CLI or a starting service can say what is wrong.
        nc = await asyncio.wait_for(nats.connect(**options), timeout=connect_timeout * 2)
        holder.append(nc)
    except (OSError, nats.errors.Error, TimeoutError) as err:
        reason = errors[-1] if errors else (str(err) or type(err).__name__)
        raise ConnectionError(f"cannot connect to NATS at {url}: {reason}") from None
    old = too_old(nc)
    if old:
        await nc.close()
        raise ConnectionError(f"cannot use NATS at {url}: {old}")
    return nc
