"""What a newcomer hits in the README's order of commands (issue 15): a venv built
before libvirt's headers were installed, then CI's `HAFENCE_REQUIRE_PEERS=1`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.peers import need

ROOT = Path(__file__).resolve().parents[1]


def make_plan(tmp_path: Path, libvirt_found: bool, stamps: list[str]) -> str:
    """What `make test` would run (make -n) with a venv holding these stamps, on a
    machine where pkg-config does or does not find libvirt."""
    make = need("make")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    pkg_config = fake_bin / "pkg-config"
    pkg_config.write_text(f"#!/bin/sh\nexit {0 if libvirt_found else 1}\n")
    pkg_config.chmod(0o755)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for stamp in stamps:
        (venv / stamp).touch()  # newer than pyproject.toml
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    result = subprocess.run([make, "-n", "-C", str(ROOT), f"VENV={venv}", "test"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_venv_made_without_libvirt_gets_the_extra_once_libvirt_is_installable(tmp_path: Path) -> None:
    # `make demo` on a machine without libvirt's headers, then `.ci/run` installs them.
    for old_stamp in (".installed", ".installed-test"):
        case = tmp_path / old_stamp.strip(".")
        case.mkdir()
        plan = make_plan(case, libvirt_found=True, stamps=[old_stamp])
        assert "pip install --quiet -e '.[test,libvirt]'" in plan, plan


def test_an_up_to_date_venv_is_not_reinstalled(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert "pip install" not in make_plan(tmp_path / "a", libvirt_found=False, stamps=[".installed-test"])
    assert "pip install" not in make_plan(tmp_path / "b", libvirt_found=True, stamps=[".installed-test-libvirt"])


def test_a_required_peer_missing_from_the_venv_fails_with_one_line_naming_the_fix(tmp_path: Path) -> None:
    # A `libvirt` that cannot be imported, whether or not the real one is installed here.
    (tmp_path / "libvirt.py").write_text('raise ImportError("No module named \'libvirt\'")\n')
    env = {**os.environ, "HAFENCE_REQUIRE_PEERS": "1", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
         "tests/test_libvirt_driver.py"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 4, out
    assert "ModuleNotFoundError" not in out and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if "libvirt" in line]
    assert len(lines) == 1 and "pip install -e '.[libvirt]'" in lines[0] and "make test" in lines[0], out
