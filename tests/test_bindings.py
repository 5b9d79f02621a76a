"""Ports bound outside production code (hafence.bindings): production never imports the lab."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hafence import bindings

ROOT = Path(__file__).resolve().parent.parent


def test_production_modules_do_not_import_the_lab() -> None:
    # Only the lab itself, the simulator and the CLI's `demo` command (which runs the lab) may.
    allowed = {ROOT / "shared" / "cli" / "__init__.py"}
    offenders = []
    for base in (ROOT / "services", ROOT / "shared"):
        for path in base.rglob("*.py"):
            if path in allowed or path.is_relative_to(ROOT / "shared" / "lab") \
                    or path.is_relative_to(ROOT / "shared" / "sim"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "hafence.lab" in line or re.search(r"HAFENCE_FAULT", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_lab_binds_its_power_switch_and_watchdog_through_entry_points(tmp_path: Path) -> None:
    switch = bindings.power_switch("sim", tmp_path)
    switch.switch("h1", "off")
    assert switch.read("h1") == "off" and switch.power_cycles("h1") == 1
    watchdog = bindings.resolve("watchdog", "sim")(tmp_path / "wd", "h1")
    assert watchdog.arm(5.0) == 5.0


def test_a_binding_registered_in_process_wins_and_an_unknown_one_is_named() -> None:
    fake = object()
    bindings.register("power_switch", "test-fake", lambda *args: fake)
    try:
        assert bindings.power_switch("test-fake", "x") is fake
    finally:
        bindings.unregister("power_switch", "test-fake")
    with pytest.raises(bindings.UnknownBinding, match=r"power_switch:nope.*power_switch:sim"):
        bindings.resolve("power_switch", "nope")
