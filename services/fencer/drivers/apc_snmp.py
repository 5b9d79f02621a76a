"""The ``apc_snmp`` driver: APC switched PDUs over SNMP v1, v2c or v3 (PowerNet-MIB).

The outlet tables are the ones ``fence_apc_snmp`` uses: the original
MasterSwitch ``sPDUOutletCtl``, MasterSwitch Plus (outlets addressed as
``switch:outlet``), the rack PDU ``rPDUOutletControl``/``rPDUOutletStatus``
tables, and the rPDU2 ``rPDU2OutletSwitched`` tables. ``model = "auto"`` reads
``sysObjectID`` to choose, falling back to MasterSwitch like fence_apc_snmp.

Unlike fence_apc_snmp (which reads anything that is not "on" as off), a state
value the table does not define is ``unknown``: never a confirmation.
"""

from __future__ import annotations

from dataclasses import dataclass

from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    Integer,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    UsmUserData,
    get_cmd,
    set_cmd,
)
from pysnmp.hlapi.v3arch.asyncio import auth as snmp_auth

from hafence.config import ApcSnmpDevice, read_secret
from hafence.fencer.drivers.base import DeviceAuthError, DeviceError, DeviceUnreachable, PowerRead

SYS_OBJECT_ID = "1.3.6.1.2.1.1.2.0"
# What a timeout means to the operator (hafence fence off/test print it).
NO_ANSWER = "device down, or wrong community/credentials"
_AUTH_HINTS = ("auth", "unknown user", "digest", "decrypt", "unknown security", "unknown engine")


@dataclass(frozen=True, slots=True)
class OutletTable:
    name: str
    status_oid: str
    control_oid: str
    state_on: int
    state_off: int
    turn_on: int
    turn_off: int
    has_switches: bool = False


MODELS = {
    "masterswitch": OutletTable("APC MasterSwitch (sPDUOutletCtl)", "1.3.6.1.4.1.318.1.1.4.4.2.1.3.{o}",
                                "1.3.6.1.4.1.318.1.1.4.4.2.1.3.{o}", 1, 2, 1, 2),
    "masterswitch_plus": OutletTable("APC MasterSwitch Plus", "1.3.6.1.4.1.318.1.1.6.7.1.1.5.{s}.1.{o}",
                                     "1.3.6.1.4.1.318.1.1.6.5.1.1.5.{s}.1.{o}", 1, 2, 1, 3, True),
    "rpdu": OutletTable("APC rack PDU (rPDUOutlet)", "1.3.6.1.4.1.318.1.1.12.3.5.1.1.4.{o}",
                        "1.3.6.1.4.1.318.1.1.12.3.3.1.1.4.{o}", 1, 2, 1, 2),
    "rpdu2": OutletTable("APC rack PDU 2 (rPDU2OutletSwitched)", "1.3.6.1.4.1.318.1.1.26.9.2.3.1.5.{o}",
                         "1.3.6.1.4.1.318.1.1.26.9.2.4.1.5.{o}", 2, 1, 1, 2),
}

# sysObjectID -> outlet table, as fence_apc_snmp decides it.
SYS_OBJECT_IDS = {
    "1.3.6.1.4.1.318.1.3.4.5": "rpdu",
    "1.3.6.1.4.1.318.1.3.4.4": "masterswitch_plus",
    "1.3.6.1.4.1.318.1.3.4.6": "masterswitch",
    "1.3.6.1.4.1.318.1.3.4.9": "rpdu2",
}

_AUTH = {
    "none": snmp_auth.USM_AUTH_NONE, "md5": snmp_auth.USM_AUTH_HMAC96_MD5, "sha": snmp_auth.USM_AUTH_HMAC96_SHA,
    "sha224": snmp_auth.USM_AUTH_HMAC128_SHA224, "sha256": snmp_auth.USM_AUTH_HMAC192_SHA256,
    "sha384": snmp_auth.USM_AUTH_HMAC256_SHA384, "sha512": snmp_auth.USM_AUTH_HMAC384_SHA512,
}
_PRIV = {
    "none": snmp_auth.USM_PRIV_NONE, "des": snmp_auth.USM_PRIV_CBC56_DES, "aes": snmp_auth.USM_PRIV_CFB128_AES,
    "aes192": snmp_auth.USM_PRIV_CFB192_AES, "aes256": snmp_auth.USM_PRIV_CFB256_AES,
}


def parse_outlet(port: str) -> tuple[int, int]:
    """'3' -> (1, 3); '2:3' -> (2, 3) (switch, outlet)."""
    switch, _, outlet = port.rpartition(":")
    try:
        return (int(switch) if switch else 1), int(outlet)
    except ValueError:
        raise DeviceError(f"outlet {port!r} is not a number (or switch:number)") from None


class ApcSnmpDriver:
    driver = "apc_snmp"

    def __init__(self, name: str, config: ApcSnmpDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.switch_no, self.outlet = parse_outlet(port)
        self.lock_key = f"snmp:{config.address}:{config.port}"
        self.table: OutletTable | None = None if config.model == "auto" else MODELS[config.model]
        self._engine = SnmpEngine()
        self._auth = self._credentials()
        self._target: UdpTransportTarget | None = None

    def _credentials(self) -> CommunityData | UsmUserData:
        c = self.config
        if c.snmp_version == "3":
            auth_key = read_secret(c.auth_password_file, c.auth_password_env, f"devices.{self.name}.auth_password")
            priv_key = read_secret(c.priv_password_file, c.priv_password_env, f"devices.{self.name}.priv_password")
            return UsmUserData(
                c.username, authKey=auth_key or None, privKey=priv_key or None,
                authProtocol=_AUTH[c.auth_protocol], privProtocol=_PRIV[c.priv_protocol],
            )
        community = read_secret(c.community_file, c.community_env, f"devices.{self.name}.community") or "private"
        return CommunityData(community, mpModel=0 if c.snmp_version == "1" else 1)

    async def _transport(self) -> UdpTransportTarget:
        if self._target is None:
            self._target = await UdpTransportTarget.create(
                (self.config.address, self.config.port), timeout=self.config.timeout_s, retries=1
            )
        return self._target

    def _check(self, what: str, error_indication: object, error_status: object, error_index: object) -> None:
        if error_indication:
            text = str(error_indication)
            lowered = text.lower()
            if "timeout" in lowered or "no snmp response" in lowered:
                # An agent drops a request with a wrong community (v1/v2c) without a word, so on
                # the wire a bad community and a dead PDU are the same silence: name both.
                raise DeviceUnreachable(
                    f"{self.name}: no SNMP answer from {self.config.address}:{self.config.port} to {what}: "
                    f"{NO_ANSWER}"
                )
            if any(w in lowered for w in _AUTH_HINTS):
                raise DeviceAuthError(f"{self.name}: PDU refused our SNMP credentials: {text}")
            raise DeviceError(f"{self.name}: {what}: {text}")
        if error_status and int(error_status) != 0:  # type: ignore[call-overload]
            status = error_status.prettyPrint() if hasattr(error_status, "prettyPrint") else str(error_status)
            if status in ("noAccess", "authorizationError", "notWritable", "noSuchName") and what.startswith("set"):
                # v1 agents answer a wrong write community with noSuchName or a silent drop.
                raise DeviceAuthError(f"{self.name}: PDU refused the write ({status}): check the community or user")
            if status == "noSuchName":
                raise DeviceError(f"{self.name}: the PDU has no {what.split()[-1]} (wrong model or outlet?)")
            raise DeviceError(f"{self.name}: {what}: {status} at index {error_index}")

    async def _get(self, oid: str) -> object:
        result = await get_cmd(
            self._engine, self._auth, await self._transport(), ContextData(), ObjectType(ObjectIdentity(oid)),
            lookupMib=False,
        )
        error_indication, error_status, error_index, var_binds = result
        self._check(f"get {oid}", error_indication, error_status, error_index)
        value = var_binds[0][1]
        if value.__class__.__name__ in ("NoSuchObject", "NoSuchInstance", "EndOfMibView"):
            raise DeviceError(f"{self.name}: the PDU has no {oid} (wrong model or outlet?)")
        return value

    async def _table(self) -> OutletTable:
        if self.table is None:
            sys_oid = str(await self._get(SYS_OBJECT_ID)).lstrip(".")
            self.table = MODELS[SYS_OBJECT_IDS.get(sys_oid, "masterswitch")]
        return self.table

    def _oid(self, template: str) -> str:
        return template.format(s=self.switch_no, o=self.outlet)

    async def _set(self, value: int, what: str) -> None:
        table = await self._table()
        oid = self._oid(table.control_oid)
        result = await set_cmd(
            self._engine, self._auth, await self._transport(), ContextData(),
            ObjectType(ObjectIdentity(oid), Integer(value)), lookupMib=False,
        )
        error_indication, error_status, error_index, _ = result
        self._check(f"set {what} {oid}", error_indication, error_status, error_index)

    async def power_off(self) -> None:
        table = await self._table()
        await self._set(table.turn_off, "off")

    async def power_on(self) -> None:
        table = await self._table()
        await self._set(table.turn_on, "on")

    async def status(self) -> PowerRead:
        table = await self._table()
        value = int(await self._get(self._oid(table.status_oid)))  # type: ignore[call-overload]
        if value == table.state_on:
            return "on"
        if value == table.state_off:
            return "off"
        return "unknown"

    async def close(self) -> None:
        try:
            self._engine.close_dispatcher()
        except Exception:
            pass
