"""Placement: which surviving host each VM to restart goes to. Pure; no I/O.

VMs are placed largest first (the hardest to fit go while there is most room).
``spread`` puts each VM on the candidate with the most free memory left;
``best_fit`` on the one with the least that still fits (packs hosts, keeps big
holes for big VMs). A VM that fits nowhere is pending, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from hafence.contracts import VmSpec

Strategy = Literal["spread", "best_fit"]


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    memory_mb: int
    vcpus: int
    used_memory_mb: int
    used_vcpus: int


@dataclass(frozen=True, slots=True)
class Placement:
    vm: VmSpec
    host: str


@dataclass(frozen=True, slots=True)
class Pending:
    vm: VmSpec
    reason: str


def place(
    vms: Iterable[VmSpec],
    candidates: Sequence[Candidate],
    strategy: Strategy = "spread",
    memory_overcommit: float = 1.0,
    exclude: dict[str, set[str]] | None = None,
) -> tuple[list[Placement], list[Pending]]:
    """``exclude`` maps a VM name to hosts it must not go to (a start failed there)."""
    free_mem = {c.name: int(c.memory_mb * memory_overcommit) - c.used_memory_mb for c in candidates}
    placements: list[Placement] = []
    pending: list[Pending] = []
    exclude = exclude or {}
    for vm in sorted(vms, key=lambda v: (-v.memory_mb, -v.vcpus, v.name)):
        banned = exclude.get(vm.name, set())
        fits = [c.name for c in candidates if c.name not in banned and free_mem[c.name] >= vm.memory_mb]
        if not fits:
            if not candidates:
                reason = "no surviving host is up"
            elif len(banned) >= len(candidates):
                reason = "start failed on every candidate host"
            else:
                best = max((free_mem[c.name] for c in candidates if c.name not in banned), default=0)
                reason = f"needs {vm.memory_mb} MiB; the most free on any candidate is {best} MiB"
            pending.append(Pending(vm, reason))
            continue
        if strategy == "best_fit":
            host = min(fits, key=lambda h: (free_mem[h], h))
        else:
            host = max(fits, key=lambda h: (free_mem[h], h))
        free_mem[host] -= vm.memory_mb
        placements.append(Placement(vm, host))
    return placements, pending
