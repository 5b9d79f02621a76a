"""NATS subject matching: tokens split on '.', '*' matches one token, '>' the rest (one or more)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=65536)
def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` (no wildcards) matches ``pattern`` (may hold wildcards)."""
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i  # '>' needs at least one token
        if i >= len(have):
            return False
        if token != "*" and token != have[i]:
            return False
    return len(have) == len(want)


@lru_cache(maxsize=65536)
def matches_any(patterns: tuple[str, ...], subject: str) -> bool:
    """Whether ``subject`` matches one of ``patterns``; no patterns means every subject."""
    return not patterns or any(subject_matches(p, subject) for p in patterns)


def valid_subject(subject: str) -> bool:
    """A publishable subject: non-empty tokens, no wildcards, no whitespace."""
    if not subject or any(c.isspace() for c in subject):
        return False
    return all(token and token not in ("*", ">") for token in subject.split("."))
