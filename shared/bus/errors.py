"""What a handler raises to say what should become of its message."""

from __future__ import annotations


class Reject(Exception):
    """The message decoded but can never be processed: dead-letter it with this reason."""


class Retry(Exception):
    """Processing failed for a reason that may pass: redeliver after ``delay``."""

    def __init__(self, reason: str, delay: float = 1.0) -> None:
        super().__init__(reason)
        self.delay = delay


