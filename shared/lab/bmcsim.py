"""A simulated BMC that speaks IPMI 2.0 over LAN (RMCP+, cipher suite 3), built on
pyghmi's BMC server. Its chassis power drives a simulated host: it switches the
same power-state file the lab's agents obey, so "chassis power off" really
stops the host's heartbeats and VMs.

One process serves one BMC per host, each on its own UDP port on 127.0.0.1:

    python -m hafence.lab.bmcsim --power-dir DIR --user admin --password-file F \\
        --bmc lab-1=6231 --bmc lab-2=6232

``ipmitool -I lanplus -H 127.0.0.1 -p 6231 -U admin -P … chassis power status``
and ``fence_ipmilan`` work against it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

import pyghmi.ipmi.bmc as bmc
import pyghmi.ipmi.private.serversession as serversession
import pyghmi.ipmi.private.session as ipmisession

from hafence.lab.power import SimPowerSwitch

_RMCP_NO_CIPHER_SUITE_MATCH = 0x11
_accept_open_session = serversession.ServerSession.create_open_session_response


def _open_session_cipher_suite_3_only(self, request):  # type: ignore[no-untyped-def]
    """pyghmi's server answers every RMCP+ open-session request as if it agreed,
    although it only speaks cipher suite 3 (HMAC-SHA1). A client proposing
    SHA-256 (suite 17, pyghmi's own client does that first) then fails its RAKP
    check. A real BMC refuses the proposal, and the client falls back: so do we."""
    auth_algorithm, integrity_algorithm = request[12], request[20]
    if auth_algorithm != 1 or integrity_algorithm != 1:
        self.clientsessionid = request[4:8]
        return bytearray([request[0], _RMCP_NO_CIPHER_SUITE_MATCH, 0, 0]) + request[4:8]
    return _accept_open_session(self, request)


serversession.ServerSession.create_open_session_response = _open_session_cipher_suite_3_only


class SimBmc(bmc.Bmc):
    def __init__(self, authdata: dict[str, str], port: int, switch: SimPowerSwitch, target: str,
                 off_delay_s: float, stuck_on: bool = False, address: str = "127.0.0.1") -> None:
        super().__init__(authdata, port=port, address=address)
        self.switch = switch
        self.target = target
        self.off_delay_s = off_delay_s
        self.stuck_on = stuck_on

    def get_power_state(self) -> str:
        return self.switch.read(self.target)

    def power_off(self) -> int:
        if not self.stuck_on:
            self.switch.switch(self.target, "off", self.off_delay_s)
        return 0

    def power_on(self) -> int:
        self.switch.switch(self.target, "on")
        return 0

    def power_cycle(self) -> int:
        self.switch.switch(self.target, "off")
        self.switch.switch(self.target, "on", self.off_delay_s)
        return 0

    def power_reset(self) -> int:
        return self.power_cycle()

    def power_shutdown(self) -> int:
        return self.power_off()

    def is_active(self) -> bool:
        return self.get_power_state() == "on"

    def get_system_guid(self):  # type: ignore[no-untyped-def]
        return self.uuid

    def cold_reset(self) -> int:
        return 0


def serve(bmcs: list[SimBmc], stop: threading.Event) -> None:
    while not stop.is_set():
        ipmisession.Session.wait_for_rsp(timeout=0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hafence.lab.bmcsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--power-dir", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--bmc", action="append", default=[], metavar="TARGET=PORT")
    parser.add_argument("--off-delay", type=float, default=0.2, help="seconds until 'off' takes effect")
    parser.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 inside a container)")
    parser.add_argument("--stuck-on", action="append", default=[], metavar="TARGET",
                        help="this BMC accepts 'off' but the host stays on")
    args = parser.parse_args(argv)
    password = Path(args.password_file).read_text().strip()
    switch = SimPowerSwitch(args.power_dir)
    bmcs = []
    for spec in args.bmc:
        target, _, port = spec.partition("=")
        bmcs.append(SimBmc({args.user: password}, int(port), switch, target, args.off_delay,
                           stuck_on=target in args.stuck_on, address=args.address))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"bmcsim: serving {len(bmcs)} BMCs on {args.address} (pid {os.getpid()})", flush=True)
    serve(bmcs, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
