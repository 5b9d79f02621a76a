"""The lab's simulated power devices as processes: IPMI BMCs, an APC PDU and
Redfish BMCs, each on free ports of 127.0.0.1, each dying with its parent."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from hafence.lab.procs import die_with_parent


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Peer:
    """A simulator process; ready once it has printed its 'serving' line."""

    def __init__(self, module: str, args: list[str], workdir: Path, name: str) -> None:
        self.module = module
        self.args = args
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Peer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if b"serving" in self.log.read_bytes():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.module} not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bmc_sim(workdir: Path, power_dir: Path, password_file: Path, bmcs: dict[str, int], user: str = "admin",
            off_delay: float = 0.2, stuck_on: tuple[str, ...] = ()) -> Peer:
    args = ["--power-dir", str(power_dir), "--user", user, "--password-file", str(password_file),
            "--off-delay", str(off_delay)]
    args += [x for target, port in bmcs.items() for x in ("--bmc", f"{target}={port}")]
    args += [x for target in stuck_on for x in ("--stuck-on", target)]
    return Peer("hafence.lab.bmcsim", args, workdir, "bmcsim")


def pdu_sim(workdir: Path, power_dir: Path, community_file: Path, port: int, outlets: dict[int, str],
            off_delay: float = 0.2, stuck_on: tuple[int, ...] = (), v3: tuple[str, Path, Path] | None = None,
            sys_object_id: str = "", name: str = "pdusim", op_log: Path | None = None) -> Peer:
    args = ["--port", str(port), "--power-dir", str(power_dir), "--community-file", str(community_file),
            "--off-delay", str(off_delay)]
    args += [x for n, target in outlets.items() for x in ("--outlet", f"{n}={target}")]
    args += [x for n in stuck_on for x in ("--stuck-on", str(n))]
    if v3:
        args += ["--v3-user", v3[0], "--v3-auth-file", str(v3[1]), "--v3-priv-file", str(v3[2])]
    if sys_object_id:
        args += ["--sys-object-id", sys_object_id]
    if op_log is not None:
        args += ["--op-log", str(op_log)]
    return Peer("hafence.lab.pdusim", args, workdir, name)


def redfish_sim(workdir: Path, power_dir: Path, password_file: Path, bmcs: dict[str, int], cert_dir: Path,
                user: str = "admin", off_delay: float = 0.2, stuck_on: tuple[str, ...] = ()) -> Peer:
    args = ["--power-dir", str(power_dir), "--user", user, "--password-file", str(password_file),
            "--cert-dir", str(cert_dir), "--off-delay", str(off_delay)]
    args += [x for target, port in bmcs.items() for x in ("--bmc", f"{target}={port}")]
    args += [x for target in stuck_on for x in ("--stuck-on", target)]
    return Peer("hafence.lab.redfishsim", args, workdir, "redfishsim")
