"""Dead letters: what cannot be processed is kept, with its reason, and never stops the caller.

A dead letter is the last resort of the bus's error handling, so it must not
fail in a way its caller has to handle: the original message's ``Nats-*``
headers are dropped (a hostile ``Nats-Expected-Stream`` would make the DLQ
refuse the letter), the body, reason and headers kept are bounded, and a failed
publish is logged and reported as ``False`` (a JetStream caller then naks, so
nothing is lost), never raised.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from nats.aio.msg import Msg

from hafence import metrics
from hafence.bus.base import BusBase
from hafence.contracts import DeadLetter, Message, encode
from hafence.logs import fields
from hafence.routes import MAX_DEAD_LETTER_ERROR, MAX_DEAD_LETTER_RAW, Violation

log = logging.getLogger("hafence.bus")

# Core-NATS messages (heartbeats, agent commands) are dead-lettered in the background
# so that a flood of garbage cannot slow the loop that serves good messages; beyond
# this many letters in flight, further ones are counted and logged, not stored.
MAX_LETTERS_IN_FLIGHT = 64
_MAX_HEADERS = 16
_HEADER_KEY = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
_MAX_SUBJECT = 256


def _printable(text: str, limit: int) -> str:
    """ASCII, no control characters, at most ``limit`` characters: safe in a header or a log line."""
    text = text[:limit].encode("ascii", "backslashreplace").decode("ascii")[:limit]
    return "".join(c if " " <= c <= "~" else " " for c in text)


def kept_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The original headers a dead letter may carry: never ``Nats-*`` (they would steer
    the DLQ publish itself), a bounded number, bounded lengths."""
    kept: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if len(kept) >= _MAX_HEADERS:
            break
        if not isinstance(key, str) or not _HEADER_KEY.match(key) or key.lower().startswith("nats-"):
            continue
        kept[key] = _printable(str(value), 256)
    return kept


class DeadLetters(BusBase):
    async def dead_letter(
        self, subject: str, raw: bytes, error: str, headers: dict[str, str] | None, msg_id: str = ""
    ) -> bool:
        """Store ``raw`` in this service's dead-letter subject with ``error``.

        Returns whether the dead-letter stream acknowledged it; never raises."""
        self.dead_letters += 1
        try:
            metrics.DEAD_LETTERS.labels(self.service).inc()
            error = error[:MAX_DEAD_LETTER_ERROR]
            subject = subject[:_MAX_SUBJECT]
            log.warning("dead-lettered a message", extra=fields(
                subject=_printable(subject, _MAX_SUBJECT), error=_printable(error, 512),
                size=len(raw), dlq=self.subjects.dlq(self.dlq_name)))
            letter = DeadLetter(service=self.dlq_name, subject=subject, error=error, raw=raw[:MAX_DEAD_LETTER_RAW],
                                at=time.time(), size=len(raw), truncated=len(raw) > MAX_DEAD_LETTER_RAW)
            hdrs = kept_headers(headers)
            if msg_id:
                hdrs["Nats-Msg-Id"] = msg_id
            hdrs["Hafence-Error"] = _printable(error, 512)
            await self.js.publish(self.subjects.dlq(self.dlq_name), encode(letter), headers=hdrs, timeout=5.0)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.error("could not publish a dead letter", extra=fields(
                subject=_printable(subject, _MAX_SUBJECT), error=_printable(error, 512),
                cause=_printable(repr(err), 512)))
            return False

    def dead_letter_soon(self, subject: str, raw: bytes, error: str, headers: dict[str, str] | None) -> None:
        """Dead-letter a core-NATS message without waiting for the stream (bounded in flight)."""
        if len(self._letters_in_flight) >= MAX_LETTERS_IN_FLIGHT:
            self.dead_letters += 1
            self.dead_letters_dropped += 1
            if self.dead_letters_dropped in (1, 10, 100) or self.dead_letters_dropped % 1000 == 0:
                log.error("too many dead letters at once; not storing them", extra=fields(
                    subject=_printable(subject, _MAX_SUBJECT), error=_printable(error, 512),
                    dropped=self.dead_letters_dropped))
            return
        task = asyncio.get_running_loop().create_task(self.dead_letter(subject, raw, error, headers))
        self._letters_in_flight.add(task)
        task.add_done_callback(self._letters_in_flight.discard)

    async def letters_sent(self, timeout: float = 2.0) -> None:
        """Wait (bounded) for the dead letters still in flight."""
        if self._letters_in_flight:
            await asyncio.wait(set(self._letters_in_flight), timeout=timeout)

    def _decode(self, msg: Msg, accepts: tuple[type[Message], ...] | None) -> tuple[Any, str]:
        """(message, "") or (None, why not): S5 (the subject picks the decoder, the payload
        matches the subject), the size and nesting bounds, and any decoding failure at all."""
        try:
            return self.routes.decode(msg.subject, msg.data, accepts), ""
        except Violation as err:
            return None, str(err)
        except Exception as err:  # L3: whatever a decoder raises, the message is the problem
            return None, f"undecodable message: {type(err).__name__}: {err}"
