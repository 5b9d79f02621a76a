"""Low-cardinality span names from subjects."""

from __future__ import annotations


def subject_kind(subject: str) -> str:
    """'hafence.fence.request.lab-2' -> 'fence.request' (span names stay low-cardinality)."""
    parts = subject.split(".")
    if len(parts) >= 3 and parts[1] in ("fence",):
        return ".".join(parts[1:3])
    if len(parts) >= 4 and parts[1] in ("host", "vm"):
        return f"{parts[1]}.{parts[3]}"
    return parts[1] if len(parts) > 1 else subject

