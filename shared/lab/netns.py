"""Lab hosts with their own network: a network namespace joined to the root
namespace by a veth pair on a private /30 that exists only on this machine.
Cutting the veth is a network partition of that host and nothing else: its
processes keep running and keep writing to the (shared) file system.

Needs root and iproute2. Every namespace and link made here is removed by
``destroy`` (the lab calls it on the way out, also after a failure).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


@dataclass(frozen=True)
class NetNamespace:
    name: str
    veth_root: str
    host_ip: str  # the root namespace's end: where the lab's NATS listens
    ns_ip: str  # the lab host's own address

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def partition(self) -> None:
        _ip("link", "set", self.veth_root, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth_root, "up")

    def destroy(self) -> None:
        _ip("link", "del", self.veth_root, check=False)
        _ip("netns", "del", self.name, check=False)


def netns_available() -> bool:
    probe = "hafence-probe"
    try:
        made = _ip("netns", "add", probe, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    if made:
        _ip("netns", "del", probe, check=False)
    return made


def create(tag: str, index: int) -> NetNamespace:
    """Namespace ``hf-<tag>`` with 10.231.<index>.2/30, the root side 10.231.<index>.1/30."""
    name, root, inner = f"hf-{tag}", f"hf{index}r", f"hf{index}n"
    ns = NetNamespace(name, root, f"10.231.{index}.1", f"10.231.{index}.2")
    ns.destroy()  # leftovers of a run that was killed
    try:
        _ip("netns", "add", name)
        _ip("link", "add", root, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("addr", "add", f"{ns.host_ip}/30", "dev", root)
        _ip("link", "set", root, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{ns.ns_ip}/30", "dev", inner)
        _ip("netns", "exec", name, "ip", "link", "set", inner, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as err:
        ns.destroy()
        raise RuntimeError(f"cannot make network namespace {name}: {err.stderr.strip()}") from None
    return ns
