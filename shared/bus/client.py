"""The bus every service uses: one object, its concerns in one file each."""

from __future__ import annotations

import asyncio

from hafence.bus.connection import open_connection
from hafence.bus.consume import Consuming
from hafence.bus.dead_letters import DeadLetters
from hafence.bus.provision import Provisioning
from hafence.bus.publish import Publishing
from hafence.bus.replay import Replaying
from hafence.bus.serve import Serving
from hafence.config import ClusterConfig


class Bus(Provisioning, Publishing, DeadLetters, Consuming, Replaying, Serving):
    @classmethod
    async def connect(cls, config: ClusterConfig, service: str, connect_timeout: float = 5.0) -> Bus:
        return cls(await open_connection(config, service, connect_timeout), config, service)

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        await self.letters_sent()  # the dead letters of core messages still in flight
        try:
            # Bounded: a service must be gone within 2 s of SIGTERM.
            await asyncio.wait_for(self.nc.drain(), timeout=1.0)
        except Exception:
            await self.nc.close()
