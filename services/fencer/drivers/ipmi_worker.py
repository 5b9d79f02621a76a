"""One BMC's pyghmi connection, in a process of its own.

pyghmi keeps global session state: one BMC that never answers can wedge the
sessions of every other BMC in the same process for minutes (seen as "Session
no longer connected"). A fencer must not lose every IPMI host because one BMC
is dead, so each BMC gets this small worker process. The driver talks to it
with one JSON line per request on stdin/stdout, and kills it when a request
times out: the wedged state dies with it.

Protocol: the first line is {"address", "port", "username", "password",
"privilege"}; then each line is {"op": "off"|"on"|"status"} and each answer
{"ok": true, "power": …} or {"ok": false, "kind": "auth"|"unreachable"|"device",
"message": …}. The password never appears in an answer.
"""

from __future__ import annotations

import json
import sys
from typing import Any

_AUTH_WORDS = ("password", "unauthorized", "privilege", "user", "authentication", "rakp")


def serve(stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> int:
    from pyghmi.exceptions import IpmiException
    from pyghmi.ipmi.command import Command

    hello = json.loads(stdin.readline())
    password = hello.pop("password")
    command = None
    for line in stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if command is None:
                command = Command(bmc=hello["address"], userid=hello["username"], password=password,
                                  port=hello["port"], privlevel=hello["privilege"], keepalive=False)
            if op == "status":
                reply: dict[str, Any] = {"ok": True, "power": command.get_power().get("powerstate", "unknown")}
            elif op in ("on", "off"):
                command.set_power(op, wait=False)
                reply = {"ok": True}
            else:
                reply = {"ok": False, "kind": "device", "message": f"unknown op {op!r}"}
        except IpmiException as err:
            command = None
            text = str(err) if err.args and err.args[0] else ""
            if not text:
                reply = {"ok": False, "kind": "unreachable", "message": "no IPMI session"}
            elif any(word in text.lower() for word in _AUTH_WORDS):
                reply = {"ok": False, "kind": "auth", "message": text}
            else:
                reply = {"ok": False, "kind": "device", "message": text}
        except OSError as err:
            command = None
            reply = {"ok": False, "kind": "unreachable", "message": err.strerror or str(err)}
        stdout.write(json.dumps(reply).replace(password, "***") + "\n") if password else stdout.write(
            json.dumps(reply) + "\n"
        )
        stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
