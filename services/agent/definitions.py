"""The ``definitions`` port of the agent core: resolves a VM definition's path.

The definitions directory is on shared storage. ``os.path.realpath`` walks every
component of the path with ``lstat``, and on a hung NFS mount that blocks: it runs
in a worker thread, so a storage hang stalls the one command that asked, never the
agent's event loop (its heartbeats, its answers to other commands).
"""

from __future__ import annotations

import asyncio
import os


class DefinitionsDir:
    async def resolve(self, path: str, directory: str) -> tuple[str, str]:
        """The path and the directory with every symlink resolved."""
        return await asyncio.to_thread(lambda: (os.path.realpath(path), os.path.realpath(directory)))
