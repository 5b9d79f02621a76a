"""A plain-text table of benchmark figures."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def add(self, figure: str, value: str, unit: str, note: str = "") -> None:
        self.rows.append((figure, value, unit, note))

    def add_distribution(self, figure: str, values: list[float], unit: str, note: str = "") -> None:
        self.add(f"{figure} p50", f"{percentile(values, 50):.1f}", unit, f"n={len(values)} {note}".strip())
        self.add(f"{figure} p99", f"{percentile(values, 99):.1f}", unit, f"max {max(values):.1f}")
        self.add(f"{figure} mean", f"{statistics.fmean(values):.1f}", unit, "")

    def render(self) -> str:
        header = ("figure", "value", "unit", "note")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        line = "  ".join("-" * w for w in widths)
        out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
        for row in self.rows:
            out.append("  ".join(
                (c.rjust(w) if i == 1 else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ))
        return "\n".join(out)
