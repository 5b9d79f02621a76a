"""What every command shares: exit codes, loading the config, who the operator is."""

from __future__ import annotations

import sys

from hafence.config import ClusterConfig, ConfigError, load_config

EXIT_OK, EXIT_NOT_CONFIRMED, EXIT_USAGE = 0, 1, 2


def _load(path: str) -> ClusterConfig | None:
    try:
        return load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


def _load_for_host(path: str, host: str) -> ClusterConfig | None:
    """The config, if it loads and names ``host``; else the error is printed."""
    config = _load(path)
    if config is None:
        return None
    try:
        config.host(host)
    except KeyError as err:
        print(f"hafence: {err.args[0]}", file=sys.stderr)
        return None
    return config


def operator() -> str:
    import getpass
    import os

    return os.environ.get("SUDO_USER") or getpass.getuser()
