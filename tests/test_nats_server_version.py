"""hafence runs only on a nats-server that reads the subject filter of a
compare-and-set (2.11 and later): an older one would ignore it and refuse every
placement record but the first, and no VM would be restarted. A service says so
when it connects, instead of failing at its first failover."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from nats.aio.client import ServerVersion

from hafence.bus.connection import too_old


def connected_to(version: str) -> Any:
    return SimpleNamespace(connected_server_version=ServerVersion(version))


@pytest.mark.parametrize("version", ["2.10.22", "2.9.0", "1.4.1"])
def test_a_server_older_than_2_11_is_refused_with_its_version_and_why(version: str) -> None:
    reason = too_old(connected_to(version))
    assert reason.startswith(f"nats-server {version} is too old: hafence needs 2.11 or later")
    assert "placement records" in reason


@pytest.mark.parametrize("version", ["2.11.0", "2.12.3", "2.15.1", "3.0.0"])
def test_a_server_of_2_11_or_later_is_taken(version: str) -> None:
    assert too_old(connected_to(version)) == ""


def test_a_version_that_cannot_be_read_is_refused() -> None:
    assert "cannot be read" in too_old(connected_to("unknown"))


async def test_the_servers_the_tests_run_on_are_new_enough(nc: Any) -> None:
    assert too_old(nc) == ""
