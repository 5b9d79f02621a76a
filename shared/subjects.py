"""NATS subject names, and the validation of the names that go into them.

A host or VM name becomes one token of a subject, so it must not contain the
characters NATS gives meaning to (``.``, ``*``, ``>``) or whitespace. Names are
checked here, at the edge, before any subject is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import get_args

from hafence.contracts import NAME_PATTERN, HostEventKind, VmEventKind

__all__ = ["HOST_EVENT_KINDS", "NAME_PATTERN", "VM_EVENT_KINDS", "InvalidName", "Subjects", "check_name"]

_NAME_RE = re.compile(NAME_PATTERN)


class InvalidName(ValueError):
    """A host, VM or service name that cannot be used as a subject token."""


def check_name(kind: str, value: str) -> str:
    # fullmatch: the whole string is the name, a trailing newline included.
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"invalid {kind} name {value!r}: use 1-63 letters, digits, '-' or '_', "
            "starting with a letter or digit (no dots, wildcards or spaces)"
        )
    return value


# The kinds are the contracts' own vocabularies, never a second list to keep in step.
HOST_EVENT_KINDS: tuple[str, ...] = get_args(HostEventKind)
VM_EVENT_KINDS: tuple[str, ...] = get_args(VmEventKind)


@dataclass(frozen=True, slots=True)
class Subjects:
    """Builds every subject hafence uses, under one configurable prefix."""

    prefix: str = "hafence"

    def __post_init__(self) -> None:
        for token in self.prefix.split("."):
            check_name("subject prefix token", token)

    def hb(self, host: str) -> str:
        return f"{self.prefix}.hb.{check_name('host', host)}"

    def hb_all(self) -> str:
        return f"{self.prefix}.hb.*"

    def inventory(self, host: str) -> str:
        return f"{self.prefix}.inventory.{check_name('host', host)}"

    def inventory_all(self) -> str:
        return f"{self.prefix}.inventory.*"

    def host_event(self, host: str, kind: str) -> str:
        if kind not in HOST_EVENT_KINDS:
            raise ValueError(f"unknown host event kind {kind!r}")
        return f"{self.prefix}.host.{check_name('host', host)}.{kind}"

    def host_events(self, kind: str = "*") -> str:
        return f"{self.prefix}.host.*.{kind}"

    def fence_request(self, host: str) -> str:
        return f"{self.prefix}.fence.request.{check_name('host', host)}"

    def fence_requests(self) -> str:
        return f"{self.prefix}.fence.request.*"

    def fence_result(self, host: str) -> str:
        return f"{self.prefix}.fence.result.{check_name('host', host)}"

    def fence_results(self) -> str:
        return f"{self.prefix}.fence.result.*"

    def vm_event(self, vm: str, kind: str) -> str:
        if kind not in VM_EVENT_KINDS:
            raise ValueError(f"unknown VM event kind {kind!r}")
        return f"{self.prefix}.vm.{check_name('VM', vm)}.{kind}"

    def vm_events(self) -> str:
        return f"{self.prefix}.vm.*.*"

    def placement_record(self, record: str) -> str:
        """One placement record (``Placements``): a subject each, since the events stream
        keeps a bounded number of messages per subject and a takeover must read every
        record of a failover still under way. Four tokens after the prefix, so no VM's
        events (``vm.<vm>.<kind>``) can be mistaken for one."""
        return f"{self.prefix}.vm.placements.record.{check_name('placement record', record)}"

    def placement_records(self) -> str:
        """Every scheduler's placement records: the filter of their compare-and-set."""
        return f"{self.prefix}.vm.placements.record.*"

    def agent_cmd(self, host: str) -> str:
        return f"{self.prefix}.agent.{check_name('host', host)}.cmd"

    def alert(self, kind: str) -> str:
        return f"{self.prefix}.alert.{check_name('alert kind', kind)}"

    def alerts(self) -> str:
        return f"{self.prefix}.alert.*"

    def dlq(self, service: str) -> str:
        return f"{self.prefix}.dlq.{check_name('service', service)}"

    def dlq_all(self) -> str:
        return f"{self.prefix}.dlq.*"

    def all(self) -> str:
        return f"{self.prefix}.>"
