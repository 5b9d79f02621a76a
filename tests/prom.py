"""Debian's Prometheus tools for the observability tests (CI installs them)."""

from __future__ import annotations

import os
import shutil

import pytest


def debian_tool(name: str, package: str = "prometheus") -> str:
    """A binary of Debian's prometheus packages; a skip naming the package, or a failure
    under HAFENCE_REQUIRE_PEERS=1."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("HAFENCE_REQUIRE_PEERS") == "1":
            pytest.fail(f"{name} is required (HAFENCE_REQUIRE_PEERS=1) but not installed (apt-get install {package})")
        pytest.skip(f"{name} not installed (Debian: apt-get install {package})")
    return path
