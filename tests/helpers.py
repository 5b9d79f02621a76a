"""Small helpers for integration tests that talk to a real NATS server."""

from __future__ import annotations

import time

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient

from hafence.contracts import DeadLetter, Decoders, FenceRequest, encode


async def read_stream(nc: NatsClient, stream: str, subject: str, decoder: msgspec.json.Decoder) -> list:  # type: ignore[type-arg]
    """Every message of a subject (wildcards allowed) in a stream, decoded, oldest first."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out: list = []  # type: ignore[type-arg]
    if info.state.messages == 0:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        if _matches(subject, msg.subject):
            out.append(decoder.decode(msg.data))
    return out


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


async def dead_letters(nc: NatsClient) -> list[DeadLetter]:
    return await read_stream(nc, "HAFENCE_DLQ", "hafence.dlq.*", Decoders.dead_letter)


def fence_request(host: str, request_id: str, term: int = 1, incident: str = "") -> FenceRequest:
    return FenceRequest(request_id=request_id, incident=incident or request_id, host=host, term=term,
                        requested_at=time.time())


async def publish_request(nc: NatsClient, req: FenceRequest, msg_id: str = "") -> None:
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    await nc.jetstream().publish(f"hafence.fence.request.{req.host}", encode(req), headers=headers)


async def leaders_elected(nc: NatsClient) -> bool:
    """Heartbeat, arbiter and scheduler each hold their lease."""
    try:
        kv = await nc.jetstream().key_value("HAFENCE_leases")
        return {"heartbeat", "arbiter", "scheduler"} <= set(await kv.keys())
    except Exception:
        return False


async def inventories_seen(nc: NatsClient, hosts: set[str]) -> bool:
    """Every one of ``hosts`` has reported an inventory to the events stream."""
    try:
        reports = await read_stream(nc, "HAFENCE_EVENTS", "hafence.inventory.*", Decoders.inventory)
    except Exception:
        return False
    return hosts <= {r.host for r in reports}
