"""A simulated Redfish BMC: the service root, one ComputerSystem with
``PowerState`` and ``ComputerSystem.Reset`` (On, ForceOff, GracefulShutdown,
ForceRestart), HTTP Basic auth, over HTTPS with a self-signed certificate.
The system's power drives a simulated host through the lab's power files.

    python -m hafence.lab.redfishsim --power-dir DIR --user admin --password-file F \\
        --cert-dir DIR --bmc lab-1=8443 --bmc lab-2=8444

``fence_redfish --ssl-insecure`` and hafence's ``redfish`` driver work against it.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import signal
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hafence.lab.power import SimPowerSwitch
from hafence.lab.tlscert import make_self_signed

SYSTEM_ID = "System.Embedded.1"


def make_handler(switch: SimPowerSwitch, target: str, user: str, password: str, off_delay: float,
                 stuck_on: bool) -> type[BaseHTTPRequestHandler]:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    system = f"/redfish/v1/Systems/{SYSTEM_ID}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, code: int, body: object | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("OData-Version", "4.0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if hmac.compare_digest(self.headers.get("Authorization", ""), expected):
                return True
            self._send(401, {"error": {"code": "Base.1.0.GeneralError", "message": "unauthorized"}})
            return False

        def do_GET(self) -> None:
            path = self.path.rstrip("/")
            if path in ("/redfish", ""):
                return self._send(200, {"v1": "/redfish/v1/"})
            if path == "/redfish/v1":
                return self._send(200, {"@odata.id": "/redfish/v1", "RedfishVersion": "1.6.0",
                                        "Systems": {"@odata.id": "/redfish/v1/Systems"}})
            if not self._authorized():
                return None
            if path == "/redfish/v1/Systems":
                return self._send(200, {"@odata.id": "/redfish/v1/Systems", "Members@odata.count": 1,
                                        "Members": [{"@odata.id": system}]})
            if path == system:
                state = "On" if switch.read(target) == "on" else "Off"
                return self._send(200, {
                    "@odata.id": system, "Id": SYSTEM_ID, "Name": target, "PowerState": state,
                    "Actions": {"#ComputerSystem.Reset": {
                        "target": f"{system}/Actions/ComputerSystem.Reset",
                        "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "GracefulShutdown", "ForceRestart"],
                    }},
                })
            return self._send(404, {"error": {"message": f"no resource {path}"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if not self._authorized():
                return None
            if self.path.rstrip("/") != f"{system}/Actions/ComputerSystem.Reset":
                return self._send(404, {"error": {"message": f"no action {self.path}"}})
            try:
                reset = json.loads(body)["ResetType"]
            except (ValueError, KeyError, TypeError):
                return self._send(400, {"error": {"message": "ResetType required"}})
            if reset == "On":
                switch.switch(target, "on")
            elif reset in ("ForceOff", "GracefulShutdown"):
                if not stuck_on:
                    switch.switch(target, "off", off_delay)
            elif reset == "ForceRestart":
                switch.switch(target, "off")
                switch.switch(target, "on", off_delay)
            else:
                return self._send(400, {"error": {"message": f"unsupported ResetType {reset}"}})
            return self._send(204)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hafence.lab.redfishsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--power-dir", required=True)
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--cert-dir", required=True, help="where cert.pem/key.pem are (made if missing)")
    parser.add_argument("--bmc", action="append", default=[], metavar="TARGET=PORT")
    parser.add_argument("--off-delay", type=float, default=0.2)
    parser.add_argument("--stuck-on", action="append", default=[], metavar="TARGET")
    parser.add_argument("--plain-http", action="store_true", help="no TLS (tests of the http scheme)")
    args = parser.parse_args(argv)
    password = Path(args.password_file).read_text().strip()
    cert_dir = Path(args.cert_dir)
    cert, key = cert_dir / "cert.pem", cert_dir / "key.pem"
    if not cert.exists():
        cert, key = make_self_signed(cert_dir)
    switch = SimPowerSwitch(args.power_dir)
    servers = []
    for spec in args.bmc:
        target, _, port = spec.partition("=")
        handler = make_handler(switch, target, args.user, password, args.off_delay, target in args.stuck_on)
        server = ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
        server.daemon_threads = True
        if not args.plain_http:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            server.socket = ctx.wrap_socket(server.socket, server_side=True)
        servers.append(server)
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
               for s in servers]
    for t in threads:
        t.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"redfishsim: serving {len(servers)} BMCs on 127.0.0.1", flush=True)
    stop.wait()
    for s in servers:
        s.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
