"""Heartbeat monitors can share the hosts out (``--shard I/N``): each watches its
own hosts, leads its own lease, and a silent host is suspected once, by its shard."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.contracts import Heartbeat, encode
from hafence.heartbeat.service import parse_shard, run, shard_of
from tests.conftest import eventually, running


def test_shards_split_the_hosts_and_a_bad_shard_is_named() -> None:
    hosts = [f"host-{i}" for i in range(1000)]
    sizes = Counter(shard_of(h, 4) for h in hosts)
    assert set(sizes) == {0, 1, 2, 3} and sum(sizes.values()) == 1000 and min(sizes.values()) > 200
    assert parse_shard("") == (0, 1) and parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


async def test_two_shards_each_suspect_their_own_silent_host_once(nc: NatsClient, make_config) -> None:
    config = make_config(hosts=6)
    assert [shard_of(f"h{i}", 2) for i in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    suspects: list[tuple[str, str]] = []

    async def on_suspect(msg: Msg) -> None:
        suspects.append((msg.subject.split(".")[2], msg.headers.get("Nats-Msg-Id", "") if msg.headers else ""))

    await nc.subscribe("hafence.host.*.suspect", cb=on_suspect)
    silent: set[str] = set()
    boot = {f"h{i}": f"boot{i}" for i in range(1, 7)}

    async def heartbeats() -> None:
        seq = 0
        while True:
            seq += 1
            for host in boot:
                if host not in silent:
                    await nc.publish(f"hafence.hb.{host}",
                                     encode(Heartbeat(host=host, boot_id=boot[host], seq=seq, sent_at=time.time())))
            await asyncio.sleep(0.05)

    beating = asyncio.create_task(heartbeats())
    try:
        async with (running("heartbeat", config, run, shard="0/2", instance="hb-0"),
                    running("heartbeat", config, run, shard="1/2", instance="hb-1")):
            kv = await nc.jetstream().key_value("HAFENCE_leases")

            async def both_lead() -> bool:
                try:
                    return {"heartbeat-0-of-2", "heartbeat-1-of-2"} <= set(await kv.keys())
                except Exception:
                    return False

            await eventually(both_lead, timeout=15)
            await asyncio.sleep(1.0)  # past the start-up window: everyone heard, nobody suspect
            assert suspects == []
            silent.update({"h2", "h5"})
            await eventually(lambda: {h for h, _ in suspects} == {"h2", "h5"}, timeout=15)
            await asyncio.sleep(1.0)
            assert sorted(h for h, _ in suspects) == ["h2", "h5"]  # once each: no shard speaks for another's host
    finally:
        beating.cancel()
