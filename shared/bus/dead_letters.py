"""Dead letters: a message that cannot be processed is kept whole, with its reason."""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
from nats.aio.msg import Msg

from hafence import metrics
from hafence.bus.base import BusBase
from hafence.contracts import DeadLetter, encode
from hafence.logs import fields

log = logging.getLogger("hafence.bus")

class DeadLetters(BusBase):
    async def dead_letter(
        self, subject: str, raw: bytes, error: str, headers: dict[str, str] | None, msg_id: str = ""
    ) -> None:
        self.dead_letters += 1
        metrics.DEAD_LETTERS.labels(self.service).inc()
        log.warning(
            "dead-lettered a message", extra=fields(subject=subject, error=error, dlq=self.subjects.dlq(self.service))
        )
        letter = DeadLetter(service=self.service, subject=subject, error=error, raw=raw, at=time.time())
        hdrs = dict(headers or {})
        hdrs.pop("Nats-Msg-Id", None)
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        hdrs["Hafence-Error"] = error[:512].replace("\r", " ").replace("\n", " ")
        try:
            await self.js.publish(self.subjects.dlq(self.service), encode(letter), headers=hdrs, timeout=5.0)
        except Exception:
            log.exception("could not publish to the dead-letter subject")
            raise

    async def _decode(
        self, msg: Msg, decoder: msgspec.json.Decoder[Any], msg_id: str = "", dead_letters: bool = True
    ) -> tuple[Any, str]:
        """(event, "") or (None, the error), the message dead-lettered unless told otherwise."""
        try:
            return decoder.decode(msg.data), ""
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            error = f"undecodable message: {err}"
            if dead_letters:
                await self.dead_letter(msg.subject, msg.data, error, dict(msg.headers or {}), msg_id=msg_id)
            return None, error
