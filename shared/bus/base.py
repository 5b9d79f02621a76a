"""What every part of the bus shares: the connection, the config and the names."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from hafence.bus.names import StreamNames
from hafence.config import ClusterConfig
from hafence.routes import Routes
from hafence.subjects import Subjects

Handler = Callable[[Any, Msg], Awaitable[None]]


class BusBase:
    def __init__(self, nc: NatsClient, config: ClusterConfig, service: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self.service = service
        # Whose dead letters these are: the service, or for an agent its host's own
        # subject (``agent-<host>``), so one agent cannot fill or forge another's.
        self.dlq_name = service
        self.subjects = Subjects(config.cluster.subject_prefix)
        self.streams = StreamNames.for_prefix(config.cluster.subject_prefix)
        # S5: what each subject may carry, checked for every message any consumer takes.
        self.routes = Routes.for_prefix(config.cluster.subject_prefix)
        self.dead_letters = 0
        self.dead_letters_dropped = 0
        self._letters_in_flight: set[asyncio.Task[bool]] = set()
        # Why a work-queue message was given up on, while its dead letter could not be stored.
        self._unsent_letters: dict[str, str] = {}
