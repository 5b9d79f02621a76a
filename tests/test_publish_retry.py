"""A decision's publish through a NATS hiccup: retried with back-off, bounded, and
never a crash of the arbiter's body (seen: its decide loop died on a JetStream
publish timeout while a stream elected its leader)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import msgspec
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from hafence.arbiter.service import run as arbiter
from hafence.bus.publish import Publishing
from hafence.contracts import Decoders, FenceRequest, HostEvent, encode
from hafence.retry import NotPublished, publish_retrying
from tests.conftest import eventually, running
from tests.helpers import read_stream

EVENT = HostEvent(host="h1", kind="alive", at=1.0)


class FlakyBus:
    """Fails the first publishes with the given errors, then stores."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls: list[tuple[str, str]] = []

    async def publish(self, subject: str, msg: msgspec.Struct, msg_id: str = "") -> None:
        self.calls.append((subject, msg_id))
        if self.errors:
            raise self.errors.pop(0)


async def test_transient_failures_are_retried_with_a_growing_delay_and_the_same_msg_id() -> None:
    bus = FlakyBus(nats.errors.TimeoutError(), nats.js.errors.NoStreamResponseError(), TimeoutError())
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    await publish_retrying(bus, "hafence.host.h1.alive", EVENT, "alive:1", sleep=sleep)
    assert bus.calls == [("hafence.host.h1.alive", "alive:1")] * 4
    assert slept == [0.25, 0.5, 1.0]


async def test_retries_are_bounded_and_the_error_names_the_subject() -> None:
    bus = FlakyBus(*(nats.errors.TimeoutError() for _ in range(10)))

    async def sleep(s: float) -> None:
        pass

    with pytest.raises(NotPublished, match=r"hafence.host.h1.alive \(msg id alive:1\) failed 3 times"):
        await publish_retrying(bus, "hafence.host.h1.alive", EVENT, "alive:1", attempts=3, sleep=sleep)
    assert len(bus.calls) == 3


async def test_a_permanent_error_is_not_retried() -> None:
    bus = FlakyBus(nats.errors.MaxPayloadError())
    with pytest.raises(nats.errors.MaxPayloadError):
        await publish_retrying(bus, "hafence.host.h1.alive", EVENT, "alive:1")
    assert len(bus.calls) == 1


@pytest.fixture
def publish_times_out_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The first publish of a fence request gets no ack in time, as while the
    stream elects a leader; every other publish goes through."""
    real = Publishing.publish
    failed: list[str] = []

    async def flaky(self: Publishing, subject: str, msg: msgspec.Struct, msg_id: str = "") -> None:
        if ".fence.request." in subject and not failed:
            failed.append(subject)
            raise nats.errors.TimeoutError
        await real(self, subject, msg, msg_id)

    monkeypatch.setattr(Publishing, "publish", flaky)
    yield failed


async def test_a_decision_whose_publish_times_out_is_retried_not_a_crash(
    nc: NatsClient, make_config, publish_times_out_once: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the timeout escaped the decide loop: the arbiter's body failed and
    was restarted by its supervisor (after a delay, replaying everything)."""
    caplog.set_level(logging.WARNING)
    config = make_config()
    async with running("arbiter", config, arbiter):
        await nc.jetstream().publish("hafence.host.h1.suspect", encode(HostEvent(
            host="h1", kind="suspect", at=time.time(), incident="h1-boot-4")))
        await eventually(lambda: requested(nc), timeout=20)
    assert publish_times_out_once == ["hafence.fence.request.h1"]
    [request] = await read_stream(nc, "HAFENCE_FENCE_REQUESTS", "hafence.fence.request.h1", Decoders.fence_request)
    assert isinstance(request, FenceRequest) and request.request_id == "fence-h1-boot-4"
    restarts = [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()]
    assert restarts == []


async def requested(nc: NatsClient) -> bool:
    try:
        return bool(await read_stream(nc, "HAFENCE_EVENTS", "hafence.host.h1.fence_requested", Decoders.host_event))
    except Exception:
        return False
