"""The provisioner creates what the services use; a service creates nothing,
and until the provisioner has run it says what is missing and waits."""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy

from hafence.bus.provision import DLQ_PER_SUBJECT
from hafence.config import parse_config
from hafence.lab.natsserver import NatsServer
from hafence.service import Runtime, run_service
from tests.conftest import cluster_toml, eventually


async def test_a_service_waits_for_the_provisioner_and_names_what_is_missing(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old services provisioned for themselves (with `$JS.API.>` rights)."""
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml(nats_server.url, tmp_path))
    config = parse_config(path.read_text(), str(path))
    started = asyncio.Event()

    async def body(rt: Runtime) -> None:
        started.set()
        await asyncio.Event().wait()

    caplog.set_level(logging.ERROR, logger="hafence.bus")
    stop = asyncio.Event()
    task = asyncio.create_task(run_service("fencer", config, body, argparse.Namespace(instance="t"), stop))
    try:
        await eventually(lambda: "consumer HAFENCE_FENCE_REQUESTS/fencer is missing" in caplog.text)
        assert "stream HAFENCE_EVENTS is missing" in caplog.text
        assert "hafence deploy provision" in caplog.text
        assert not started.is_set()
        with pytest.raises(nats.js.errors.NotFoundError):
            await nc.jetstream().stream_info("HAFENCE_EVENTS")  # the service created nothing
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "hafence.cli", "deploy", "provision", "--config", str(path)],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "consumer HAFENCE_FENCE_REQUESTS/fencer: ok" in result.stdout
        await eventually(started.is_set)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_provisioning_is_idempotent_and_bounds_the_dead_letters(
    nats_server: NatsServer, nc: NatsClient, tmp_path: Path
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml(nats_server.url, tmp_path))
    for _ in range(2):
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "hafence.cli", "deploy", "provision", "--config", str(path)],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    js = nc.jetstream()
    dlq = (await js.stream_info("HAFENCE_DLQ")).config
    assert dlq.max_msgs_per_subject == DLQ_PER_SUBJECT and dlq.discard == DiscardPolicy.OLD
    assert dlq.max_bytes and dlq.max_bytes > 0 and dlq.max_msg_size and dlq.max_msg_size > 0
    fencer = (await js.consumer_info("HAFENCE_FENCE_REQUESTS", "fencer")).config
    assert fencer.ack_wait == parse_config(path.read_text()).timings.fence_ack_wait_s
    assert (await js.stream_info("KV_HAFENCE_leases")).config.num_replicas == 1

