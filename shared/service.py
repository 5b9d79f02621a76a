"""The lifecycle every hafence service shares.

``python -m hafence.<service> --config FILE``: load the config (a bad file is a
clear error and exit code 2), set up logs and traces, connect to NATS (waiting
for it if it is not up yet), wait until the provisioner has created what it
needs (``hafence deploy provision``), then run the service's body inside one
TaskGroup until SIGTERM/SIGINT. On the way out: cancel the body, drain the NATS
connection, flush the spans.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from hafence import metrics
from hafence.bus import Bus
from hafence.config import ClusterConfig, ConfigError, load_config
from hafence.logs import setup_logging
from hafence.telemetry import setup_tracing

log = logging.getLogger("hafence.service")


@dataclass
class Runtime:
    name: str
    config: ClusterConfig
    bus: Bus
    instance: str
    args: argparse.Namespace = field(default_factory=argparse.Namespace)

    def db_path(self, filename: str) -> str:
        return os.path.join(self.config.store.dir, filename)


Body = Callable[[Runtime], Awaitable[None]]


class _Stopped(Exception):
    pass


def service_main(
    name: str,
    body: Body,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m hafence.{name}", description=f"hafence {name} service")
    parser.add_argument("--config", required=True, help="cluster configuration (TOML)")
    parser.add_argument(
        "--instance", default=f"{socket.gethostname()}-{os.getpid()}", help="replica name (for leases)"
    )
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(name)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"hafence {name}: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_service(name, config, body, args))
    except ConnectionError as err:
        print(f"hafence {name}: {err}", file=sys.stderr)
        return 3
    return 0


async def connect_until_up(config: ClusterConfig, name: str, stop: asyncio.Event) -> Bus | None:
    delay = 0.2
    while not stop.is_set():
        try:
            return await Bus.connect(config, name)
        except ConnectionError as err:
            log.warning("%s; retrying in %.1fs", err, delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
    return None


async def supervise(name: str, body: Body, runtime: Runtime) -> None:
    """Run the body; if it fails (NATS gone mid-publish, a bug), log it and start
    it again after a back-off. Its state is rebuilt from JetStream and its own
    database, which is what L2 promises; the process stays up for its supervisor
    (compose, systemd) to see, and its TaskGroup leaves no task behind."""
    delay = 0.5
    while True:
        started = asyncio.get_running_loop().time()
        try:
            await body(runtime)
            return
        except Exception as err:
            errors = err.exceptions if isinstance(err, ExceptionGroup) else [err]
            log.error("%s failed; restarting in %.1fs: %s", name, delay,
                      "; ".join(f"{type(e).__name__}: {e}" for e in errors), exc_info=err)
        if asyncio.get_running_loop().time() - started > 60:
            delay = 0.5
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


# A service stops within 2 s of SIGTERM, under any load (the quality bar). Cancelled
# work normally ends in milliseconds; this is the bound when it does not.
STOP_DEADLINE_S = 1.8


def stop_if_cancelled() -> None:
    """Raise a cancellation that a library swallowed. On Python 3.11, ``wait_for``
    (nats-py's request and JetStream publish use it) returns normally when the
    cancel lands as its wait ends; the task is still marked cancelling, so a loop
    that goes round again would never stop (seen: an agent that ignored SIGTERM
    after parallel starts). Loops call this once per round."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def exit_if_not_stopped_within(seconds: float, name: str) -> None:
    """Last resort for a process asked to stop: if cancelled work, a drain or a span
    flush still holds it after ``seconds``, leave anyway. A thread, because the event
    loop is what may be stuck. Only for the process entry point, never in-process."""

    def leave() -> None:
        sys.stderr.write(f"hafence {name}: did not stop within {seconds:.1f}s of the signal; exiting now\n")
        sys.stderr.flush()
        os._exit(0)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


async def run_service(
    name: str,
    config: ClusterConfig,
    body: Body,
    args: argparse.Namespace,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a service until ``stop`` is set (by default: until SIGTERM or SIGINT)."""
    instance: str = getattr(args, "instance", f"{socket.gethostname()}-{os.getpid()}")
    provider = setup_tracing(name, config.telemetry, instance)
    metrics.serve(
        int(os.environ.get("HAFENCE_METRICS_PORT", config.metrics.port)),
        os.environ.get("HAFENCE_METRICS_ADDRESS", config.metrics.address),
        service=name, config=config, host=getattr(args, "host", ""),
    )
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signalled = stop

        def on_signal() -> None:
            signalled.set()
            exit_if_not_stopped_within(STOP_DEADLINE_S, name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
    bus = await connect_until_up(config, name, stop)
    try:
        if bus is None:
            return
        # The provisioner creates streams, consumers and the bucket; a service only
        # checks they exist (and says which is missing). Agents only publish.
        if name != "agent" and not await bus.wait_provisioned(name, stop):
            return
        if name == "agent" and getattr(args, "host", ""):
            bus.dlq_name = f"agent-{args.host}"
        runtime = Runtime(name=name, config=config, bus=bus, instance=instance, args=args)
        log.info("started", extra={"fields": {"instance": instance}})
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(supervise(name, body, runtime))
                await stop.wait()
                raise _Stopped
        except* _Stopped:
            log.info("stopping on signal")
    finally:
        if bus is not None:
            await bus.close()
        provider.shutdown()
