"""The ``redfish`` driver: a BMC's Redfish service over HTTPS.

Finds the ComputerSystem (the configured id, or the first member of
/redfish/v1/Systems), posts ``ComputerSystem.Reset`` with ForceOff / On to the
target the system advertises, and reads ``PowerState`` back. TLS verification
is on by default (``ca_file`` for a BMC's own CA). HTTP Basic auth on every
request, so nothing depends on a session surviving a BMC reset.

Built on the standard library (http.client in a worker thread): a fence is a
handful of requests, not worth another HTTP stack in the fencer's dependencies.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import ssl
from typing import Any

from hafence.config import RedfishDevice, read_secret
from hafence.fencer.drivers.base import DeviceAuthError, DeviceError, DeviceUnreachable, PowerRead

_POWER = {"On": "on", "Off": "off"}


class RedfishDriver:
    driver = "redfish"

    def __init__(self, name: str, config: RedfishDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.lock_key = f"redfish:{config.address}:{config.port}"
        password = read_secret(config.password_file, config.password_env, f"devices.{name}.password")
        self._auth = "Basic " + base64.b64encode(f"{config.username}:{password}".encode()).decode()
        self._system_uri = f"/redfish/v1/Systems/{config.system_id}" if config.system_id else ""
        self._reset_uri = ""
        self._tls = self._tls_context() if config.scheme == "https" else None

    def _tls_context(self) -> ssl.SSLContext:
        if not self.config.verify_tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=self.config.ca_file or None)

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        c = self.config
        if self._tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                c.address, c.port, timeout=c.timeout_s, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(c.address, c.port, timeout=c.timeout_s)
        headers = {"Authorization": self._auth, "Accept": "application/json", "OData-Version": "4.0"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except ssl.SSLCertVerificationError as err:
            raise DeviceError(
                f"{self.name}: TLS certificate of {c.address} not trusted ({err.verify_message}); "
                "set ca_file to the BMC's CA, or verify_tls = false"
            ) from None
        except (TimeoutError, OSError) as err:
            raise DeviceUnreachable(f"{self.name}: {c.scheme}://{c.address}:{c.port}: {err}") from None
        finally:
            conn.close()
        if resp.status == 401 or resp.status == 403:
            raise DeviceAuthError(f"{self.name}: BMC refused user {c.username!r} (HTTP {resp.status})")
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        return resp.status, payload

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        return await asyncio.wait_for(
            asyncio.to_thread(self._request, method, path, body), timeout=self.config.timeout_s + 1
        )

    async def _system(self) -> dict[str, Any]:
        if not self._system_uri:
            status, listing = await self._call("GET", "/redfish/v1/Systems")
            members = listing.get("Members") if isinstance(listing, dict) else None
            if status != 200 or not members:
                raise DeviceError(f"{self.name}: /redfish/v1/Systems lists no system (HTTP {status})")
            self._system_uri = members[0]["@odata.id"]
        status, system = await self._call("GET", self._system_uri)
        if status != 200 or not isinstance(system, dict):
            raise DeviceError(f"{self.name}: GET {self._system_uri}: HTTP {status}")
        return system

    async def _reset(self, reset_type: str) -> None:
        if not self._reset_uri:
            system = await self._system()
            try:
                self._reset_uri = system["Actions"]["#ComputerSystem.Reset"]["target"]
            except (KeyError, TypeError):
                raise DeviceError(f"{self.name}: the system offers no ComputerSystem.Reset action") from None
        status, reply = await self._call("POST", self._reset_uri, {"ResetType": reset_type})
        if status not in (200, 202, 204):
            message = ""
            if isinstance(reply, dict):
                message = str(reply.get("error", {}).get("message", ""))
            raise DeviceError(f"{self.name}: Reset {reset_type}: HTTP {status} {message}".rstrip())

    async def power_off(self) -> None:
        await self._reset("ForceOff")

    async def power_on(self) -> None:
        await self._reset("On")

    async def status(self) -> PowerRead:
        system = await self._system()
        return _POWER.get(str(system.get("PowerState")), "unknown")  # type: ignore[return-value]

    async def close(self) -> None:
        pass
