"""A simulated APC switched PDU speaking SNMP v1, v2c and v3 (pysnmp's engine),
serving the PowerNet-MIB outlet tables ``fence_apc_snmp`` and hafence's
``apc_snmp`` driver use. Each outlet feeds a simulated host: switching it
switches the power-state file the lab's agents obey.

    python -m hafence.lab.pdusim --port 16100 --power-dir DIR --community-file F \\
        --outlet 1=lab-1 --outlet 2=lab-2 [--v3-user fence --v3-auth-file A --v3-priv-file P]

Tables served: sPDUOutletCtl (MasterSwitch), the MasterSwitch Plus tables (as
switch 1), rPDUOutletControl/Status (rack PDU), rPDU2OutletSwitchedControl/Status,
and the outlet name tables; sysObjectID says
"rack PDU" (or ``--sys-object-id``).

``--op-log FILE`` appends one JSON line per outlet command (``at``, ``outlet``,
``command``, ``overlaps``). A switch to off takes ``--off-delay``; a command that
arrives while another command is still switching an outlet of this PDU (a
fencer that has not yet read its outlet off) lists those outlets in
``overlaps``: two operations on one PDU at once, which fencers must never do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from pathlib import Path

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.proto import rfc1902
from pysnmp.proto.rfc1905 import EndOfMibView, NoSuchInstance
from pysnmp.smi import error as smi_error
from pysnmp.smi.instrum import AbstractMibInstrumController

from hafence.lab.power import SimPowerSwitch

APC = "1.3.6.1.4.1.318"
RPDU_SYS_OBJECT_ID = f"{APC}.1.3.4.5"


def _oid(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.strip(".").split("."))


class PduMib(AbstractMibInstrumController):
    """Serves a small, computed OID table: every read asks the power switch."""

    def __init__(self, switch: SimPowerSwitch, outlets: dict[int, str], sys_object_id: str,
                 off_delay_s: float, stuck_on: set[int], op_log: Path | None = None) -> None:
        self.switch = switch
        self.outlets = outlets
        self.off_delay_s = off_delay_s
        self.stuck_on = stuck_on
        self.op_log = op_log
        # outlet -> when its last command finishes switching (monotonic)
        self.switching_until: dict[int, float] = {}
        self.readers: dict[tuple[int, ...], Callable[[], object]] = {
            _oid("1.3.6.1.2.1.1.1.0"): lambda: rfc1902.OctetString("hafence simulated APC PDU"),
            _oid("1.3.6.1.2.1.1.2.0"): lambda: rfc1902.ObjectIdentifier(sys_object_id),
            _oid("1.3.6.1.2.1.1.5.0"): lambda: rfc1902.OctetString("hafence-pdusim"),
        }
        self.writers: dict[tuple[int, ...], Callable[[int], None]] = {}
        for n, target in outlets.items():
            self._outlet(n, target)
        self.order = sorted(self.readers)

    def _outlet(self, n: int, target: str) -> None:
        def state(on: int, off: int) -> Callable[[], object]:
            return lambda: rfc1902.Integer(on if self.switch.read(target) == "on" else off)

        def control(on: int, off: int) -> Callable[[int], None]:
            def write(value: int) -> None:
                if value in (on, off):
                    self._record(n, "on" if value == on else "off")
                if value == on:
                    self.switch.switch(target, "on")
                elif value == off:
                    if n not in self.stuck_on:
                        self.switch.switch(target, "off", self.off_delay_s)
                else:
                    raise smi_error.WrongValueError()
            return write

        name = lambda: rfc1902.OctetString(target)  # noqa: E731
        # MasterSwitch: sPDUOutletCtl (read 1 on / 2 off; write 1 on / 2 off), sPDUOutletName.
        self.readers[_oid(f"{APC}.1.1.4.4.2.1.3.{n}")] = state(1, 2)
        self.writers[_oid(f"{APC}.1.1.4.4.2.1.3.{n}")] = control(1, 2)
        self.readers[_oid(f"{APC}.1.1.4.4.2.1.4.{n}")] = name
        # Rack PDU: rPDUOutletControlOutletCommand, rPDUOutletStatusOutletName/State.
        self.readers[_oid(f"{APC}.1.1.12.3.3.1.1.4.{n}")] = state(1, 2)
        self.writers[_oid(f"{APC}.1.1.12.3.3.1.1.4.{n}")] = control(1, 2)
        self.readers[_oid(f"{APC}.1.1.12.3.5.1.1.2.{n}")] = name
        self.readers[_oid(f"{APC}.1.1.12.3.5.1.1.4.{n}")] = state(1, 2)
        # MasterSwitch Plus, outlets addressed by switch and outlet (this PDU is switch 1):
        # status (1 on, 2 off), control (1 on, 3 off).
        self.readers[_oid(f"{APC}.1.1.6.7.1.1.5.1.1.{n}")] = state(1, 2)
        self.readers[_oid(f"{APC}.1.1.6.5.1.1.5.1.1.{n}")] = state(1, 2)
        self.writers[_oid(f"{APC}.1.1.6.5.1.1.5.1.1.{n}")] = control(1, 3)
        # Rack PDU 2: rPDU2OutletSwitchedStatusName/State (1 off, 2 on), ...ControlCommand (1 on, 2 off).
        self.readers[_oid(f"{APC}.1.1.26.9.2.3.1.3.{n}")] = name
        self.readers[_oid(f"{APC}.1.1.26.9.2.3.1.5.{n}")] = state(2, 1)
        self.readers[_oid(f"{APC}.1.1.26.9.2.4.1.5.{n}")] = state(1, 2)
        self.writers[_oid(f"{APC}.1.1.26.9.2.4.1.5.{n}")] = control(1, 2)

    def _record(self, outlet: int, command: str) -> None:
        if self.op_log is None:
            return
        now = time.monotonic()
        overlaps = sorted(o for o, until in self.switching_until.items() if until > now)
        self.switching_until[outlet] = now + (self.off_delay_s if command == "off" else 0.0)
        with open(self.op_log, "a") as f:
            f.write(json.dumps({"at": time.time(), "outlet": outlet, "command": command, "overlaps": overlaps}) + "\n")

    def read_variables(self, *var_binds, **ctx):  # type: ignore[no-untyped-def]
        out = []
        for name, _ in var_binds:
            key = tuple(name)
            reader = self.readers.get(key)
            out.append((name, reader() if reader else NoSuchInstance()))
        return out

    def read_next_variables(self, *var_binds, **ctx):  # type: ignore[no-untyped-def]
        out = []
        for name, _ in var_binds:
            i = bisect_right(self.order, tuple(name))
            if i < len(self.order):
                key = self.order[i]
                out.append((rfc1902.ObjectName(key), self.readers[key]()))
            else:
                out.append((name, EndOfMibView()))
        return out

    def write_variables(self, *var_binds, **ctx):  # type: ignore[no-untyped-def]
        for idx, (name, value) in enumerate(var_binds):
            writer = self.writers.get(tuple(name))
            if writer is None:
                raise smi_error.NotWritableError(name=name, idx=idx)
            writer(int(value))
        return self.read_variables(*var_binds, **ctx)


def build_agent(args: argparse.Namespace) -> engine.SnmpEngine:
    snmp = engine.SnmpEngine()
    config.add_transport(snmp, udp.DOMAIN_NAME, udp.UdpTransport().open_server_mode((args.address, args.port)))
    community = Path(args.community_file).read_text().strip()
    config.add_v1_system(snmp, "hafence-area", community)
    if args.v3_user:
        auth_key = Path(args.v3_auth_file).read_text().strip()
        priv_key = Path(args.v3_priv_file).read_text().strip() if args.v3_priv_file else None
        config.add_v3_user(
            snmp, args.v3_user, config.USM_AUTH_HMAC96_SHA, auth_key,
            config.USM_PRIV_CFB128_AES if priv_key else config.USM_PRIV_NONE, priv_key,
        )
    outlets = {}
    for spec in args.outlet:
        number, _, target = spec.partition("=")
        outlets[int(number)] = target
    mib = PduMib(SimPowerSwitch(args.power_dir), outlets, args.sys_object_id, args.off_delay,
                 {int(x) for x in args.stuck_on}, Path(args.op_log) if args.op_log else None)
    snmp_context = context.SnmpContext(snmp)
    snmp_context.unregister_context_name(b"")
    snmp_context.register_context_name(b"", mib)
    cmdrsp.GetCommandResponder(snmp, snmp_context)
    cmdrsp.NextCommandResponder(snmp, snmp_context)
    cmdrsp.BulkCommandResponder(snmp, snmp_context)
    cmdrsp.SetCommandResponder(snmp, snmp_context)
    return snmp


async def serve(args: argparse.Namespace) -> None:
    snmp = build_agent(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    snmp.transport_dispatcher.job_started(1)
    print(f"pdusim: serving {len(args.outlet)} outlets on {args.address}:{args.port}", flush=True)
    try:
        await stop.wait()
    finally:
        snmp.transport_dispatcher.close_dispatcher()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hafence.lab.pdusim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1", help="listen address (0.0.0.0 inside a container)")
    parser.add_argument("--power-dir", required=True)
    parser.add_argument("--community-file", required=True)
    parser.add_argument("--outlet", action="append", default=[], metavar="N=TARGET")
    parser.add_argument("--sys-object-id", default=RPDU_SYS_OBJECT_ID)
    parser.add_argument("--off-delay", type=float, default=0.2)
    parser.add_argument("--stuck-on", action="append", default=[], metavar="N")
    parser.add_argument("--op-log", default="", help="append a JSON line per outlet command (overlaps included)")
    parser.add_argument("--v3-user", default="")
    parser.add_argument("--v3-auth-file", default="")
    parser.add_argument("--v3-priv-file", default="")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
