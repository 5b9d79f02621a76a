"""A service process leaves when asked, and stays up when only its metrics cannot.

A service process asked to stop leaves, even when some work swallows its cancellation.

The quality bar: SIGTERM stops a service within 2 s under any load. Work that
ignores cancellation (a library's ``wait_for`` on Python 3.11 can) must not keep
the process alive: the entry point leaves by itself after ``STOP_DEADLINE_S``.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hafence import metrics
from hafence.lab.natsserver import NatsServer
from tests.conftest import cluster_toml

BODY = textwrap.dedent(
    """
    import asyncio, sys
    from hafence.service import service_main

    async def stubborn(rt):
        print("body running", flush=True)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # the bug this guards against: a cancellation swallowed

    sys.exit(service_main("agent", stubborn, ["--config", sys.argv[1]]))
    """
)


def test_a_service_whose_work_swallows_cancellation_still_exits_on_sigterm(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(cluster_toml(nats_server.url, tmp_path, 1) + "\n[metrics]\nport = 0\n")
    script = tmp_path / "stubborn.py"
    script.write_text(BODY)
    proc = subprocess.Popen([sys.executable, str(script), str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "body running" in line, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        # Not a speed assertion: without the deadline this process never exits.
        code = proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0, err
        assert "did not stop within" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_metrics_port_in_use_is_an_error_in_the_log_not_a_stopped_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, logger="hafence.metrics"):
            assert metrics.serve(port, "127.0.0.1", service="agent") is False
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
