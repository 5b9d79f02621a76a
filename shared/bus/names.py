"""The names of the streams and the lease bucket, derived from the subject prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StreamNames:
    events: str
    fence_requests: str
    dlq: str
    leases: str

    @classmethod
    def for_prefix(cls, prefix: str) -> StreamNames:
        base = prefix.upper().replace("-", "_")
        return cls(
            events=f"{base}_EVENTS",
            fence_requests=f"{base}_FENCE_REQUESTS",
            dlq=f"{base}_DLQ",
            leases=f"{base}_leases",
        )


