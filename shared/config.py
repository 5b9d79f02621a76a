"""The cluster configuration: one TOML file, decoded into Structs.

Unknown keys are errors (a typo must not silently fall back to a default), and
every error names the file, the key and what is wrong. Checks that span several
keys (a VM on an unknown host, a level naming an unknown device) are all
collected, so an operator fixes the file in one pass.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from hafence.contracts import VmSpec
from hafence.subjects import NAME_PATTERN

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ClusterSection(_Section):
    name: Name = "hafence"
    subject_prefix: Name = "hafence"


class NatsSection(_Section):
    url: str = "nats://127.0.0.1:4222"
    user: str = ""
    # Secrets are referenced, never written in the file.
    password_file: str = ""
    password_env: str = ""
    creds_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1


class Timings(_Section):
    heartbeat_interval_s: PositiveSeconds = 1.0
    missed_heartbeats: Annotated[int, msgspec.Meta(ge=1)] = 3
    inventory_interval_s: PositiveSeconds = 30.0
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=1)] = 6.0
    agent_command_timeout_s: PositiveSeconds = 10.0
    fence_ack_wait_s: Annotated[float, msgspec.Meta(ge=1)] = 30.0
    # A fence request with no result within this long is failed by the arbiter, with an
    # alert (a dead or refusing fencer must not leave a host "fencing" for ever). Keep it
    # above the slowest topology: levels x (1 + retries) x (power_wait_s + power_timeout_s).
    fence_deadline_s: Annotated[float, msgspec.Meta(ge=1)] = 180.0

    @property
    def detection_window_s(self) -> float:
        return self.heartbeat_interval_s * self.missed_heartbeats


class TelemetrySection(_Section):
    exporter: Literal["none", "console", "otlp", "jsonl"] = "none"
    # OTLP/HTTP endpoint, e.g. http://jaeger:4318/v1/traces; jsonl: a file path.
    endpoint: str = ""


class StoreSection(_Section):
    dir: str = "/var/lib/hafence"


class ArbiterSection(_Section):
    # At most this many fences in flight; the rest wait for a slot.
    max_concurrent_fences: Annotated[int, msgspec.Meta(ge=1)] = 4
    # "off" leaves the host off for an operator to inspect; "reboot" powers it on again after confirming off.
    action: Literal["off", "reboot"] = "off"
    # More than this share of (non-maintenance) hosts lost together is a storm: fence nobody.
    storm_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    # Hosts lost (suspect, or fenced) within this window count together for the storm guard.
    storm_window_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # Two-host clusters: wait this long before fencing the peer, so two halves of a split
    # cannot shoot each other at the same moment (Pacemaker's pcmk_delay).
    two_host_delay_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    # A suspect host still renewing its storage lease is isolated, not dead: "skip" it
    # (alert), "fence" it through its topology, or write its poison "pill" (a fence
    # through its watchdog levels only: it resets itself; docs/watchdog.md).
    isolated_host_action: Literal["skip", "fence", "pill"] = "skip"
    # Whole-topology attempts after a failed fence (each after a growing back-off), then escalate.
    fence_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 3
    fence_retry_backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 15.0
    # How often an unresolved alert (fence failed, storm) is published again.
    alert_repeat_s: Annotated[float, msgspec.Meta(ge=1)] = 300.0


class MetricsSection(_Section):
    # Port of the Prometheus /metrics endpoint; 0 turns it off (HAFENCE_METRICS_PORT overrides).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    address: str = "0.0.0.0"


class StorageSection(_Section):
    # Directory on the shared storage where each agent renews <host>.lease; empty: no storage heartbeat.
    lease_dir: str = ""
    renew_interval_s: PositiveSeconds = 2.0
    # A lease renewed within this window is live.
    live_window_s: PositiveSeconds = 10.0
    # Directory on the shared storage holding <vm>.xml libvirt definitions: where a VM
    # not defined on its new host is defined from (never from an agent's report).
    definitions_dir: str = ""
    # Watchdog self-fencing (docs/watchdog.md). Directory on the shared storage with
    # each host's slot: <host>.slot (its agent's record: boot, counter, armed watchdog
    # and timeout) and <host>.pill (the poison pill the fencer writes). Empty: no slots.
    slot_dir: str = ""
    # How often an agent checks its slot (and writes its record); at most half the
    # watchdog timeout, so a pill is seen and obeyed well inside msgwait.
    slot_interval_s: PositiveSeconds = 1.0
    # The timeout an agent asks its watchdog device for (the device may round it:
    # the agent reports what the device says).
    watchdog_timeout_s: PositiveSeconds = 10.0
    # Without storage, an agent feeds its watchdog only while the monitor's view
    # listing it is at most this old; at most half the watchdog timeout.
    view_max_age_s: PositiveSeconds = 3.0


class FencerSection(_Section):
    # How often every device is logged in to and read (oVirt's "Test"), in seconds.
    health_interval_s: Annotated[float, msgspec.Meta(ge=5)] = 60.0
    # Fencer replicas share a device lock and request claims in a KV bucket with this
    # TTL (set by `hafence deploy provision`): a replica that stops renewing (killed,
    # paused, cut off) frees its devices after this long; it stops driving them itself
    # at 3/4 of it, on its own clock. See docs/fencer-replicas.md.
    lock_ttl_s: Annotated[float, msgspec.Meta(ge=1, le=300)] = 10.0


class SchedulerSection(_Section):
    # spread: the host with the most free memory; best_fit: the fullest host that fits.
    strategy: Literal["spread", "best_fit"] = "spread"
    memory_overcommit: Annotated[float, msgspec.Meta(ge=0.1, le=4)] = 1.0
    cpu_overcommit: Annotated[float, msgspec.Meta(ge=0.1, le=16)] = 4.0
    # Hosts a VM's start is tried on before it is left pending (until capacity appears).
    start_attempts: Annotated[int, msgspec.Meta(ge=1)] = 3
    # S6: a fenced host that comes back is quarantined until an operator clears it
    # (hafence host clear); true: the scheduler clears it once it reports clean.
    auto_clear: bool = False
    # VM-level HA (docs/vm-ha.md): an HA VM that fails on a live host (crashed, killed,
    # panicked) is restarted, first on its own host, then elsewhere.
    vm_restart: bool = True
    # Restarts within the window; the next failure raises a vm_restart_limit alert instead.
    vm_max_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3
    vm_restart_window_s: PositiveSeconds = 3600.0
    # Of those, how many go back to the host it failed on before it is moved elsewhere.
    vm_same_host_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 1
    # Wait before the n-th restart in the window: 0 for the first, then this, doubling, capped.
    vm_restart_backoff_s: Seconds = 10.0
    vm_restart_backoff_max_s: Seconds = 300.0
    # A shutdown from inside the guest is not a failure unless this (or the VM's own
    # setting) says so (XAPI's ha-reboot-vm-on-internal-shutdown).
    restart_on_guest_shutdown: bool = False


class AgentSection(_Section):
    # VM starts an agent runs at once (a host receiving 50 starts boots them in parallel).
    max_parallel_starts: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    # While a burst of VM commands runs, a finished start's inventory waits for the burst
    # to drain, at most this long (0: one inventory per start, as before). The reply to
    # each command is never held. At most 1 s: the scheduler's view of the host lags by
    # up to this much (docs/cores.md, "## agent").
    inventory_coalesce_s: Annotated[float, msgspec.Meta(ge=0, le=1.0)] = 0.05


class _Device(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="driver"):
    # How long to wait after the command before the first status read.
    power_wait_s: Seconds = 0.0
    # How long status may take to read "off" before the device counts as failed.
    power_timeout_s: PositiveSeconds = 20.0
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1


class SimDevice(_Device, tag="sim", kw_only=True):
    """A simulated power switch: one state file per port in ``state_dir``.

    The lab's simulated hosts read the same files, so "off" really stops them.
    """

    state_dir: str
    off_delay_s: Seconds = 0.2
    stuck_on: bool = False


class IpmiDevice(_Device, tag="ipmi", kw_only=True):
    """A BMC over IPMI 2.0 LAN (RMCP+), through pyghmi."""

    address: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 623
    username: str
    password_file: str = ""
    password_env: str = ""
    privilege: Literal["administrator", "operator"] = "administrator"
    timeout_s: PositiveSeconds = 5.0


class ApcSnmpDevice(_Device, tag="apc_snmp", kw_only=True):
    """An APC switched PDU over SNMP (PowerNet-MIB), one outlet per level entry."""

    address: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 161
    snmp_version: Literal["1", "2c", "3"] = "1"
    # v1/v2c: the community, referenced from a file or the environment.
    community_file: str = ""
    community_env: str = ""
    # v3 (USM)
    username: str = ""
    auth_protocol: Literal["none", "md5", "sha", "sha224", "sha256", "sha384", "sha512"] = "none"
    auth_password_file: str = ""
    auth_password_env: str = ""
    priv_protocol: Literal["none", "des", "aes", "aes192", "aes256"] = "none"
    priv_password_file: str = ""
    priv_password_env: str = ""
    # Which MIB table controls the outlets; "auto" reads sysObjectID as fence_apc_snmp does.
    model: Literal["auto", "masterswitch", "masterswitch_plus", "rpdu", "rpdu2"] = "auto"
    timeout_s: PositiveSeconds = 2.0


class RedfishDevice(_Device, tag="redfish", kw_only=True):
    """A BMC's Redfish service over HTTPS: ComputerSystem.Reset, PowerState."""

    address: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 443
    scheme: Literal["https", "http"] = "https"
    username: str
    password_file: str = ""
    password_env: str = ""
    # Empty: the first member of /redfish/v1/Systems.
    system_id: str = ""
    verify_tls: bool = True
    ca_file: str = ""
    timeout_s: PositiveSeconds = 5.0


class FenceAgentDevice(_Device, tag="agent", kw_only=True):
    """Any ClusterLabs fence agent (fence_ipmilan, fence_apc_snmp, …) through its
    stdin protocol. ``options`` are passed as key=value lines; secrets go in
    ``password_file``/``password_env`` and reach the agent as ``password=``."""

    agent: str
    options: dict[str, str] = {}
    password_file: str = ""
    password_env: str = ""
    # How the level entry's port reaches the agent (``plug=3``); empty: not sent.
    port_option: str = "plug"
    timeout_s: PositiveSeconds = 30.0


class WatchdogDevice(_Device, tag="watchdog", kw_only=True):
    """Watchdog self-fencing through the host's slot on shared storage (SBD-style):
    "off" writes the poison pill; it reads "off" once the host has provably stopped
    (docs/watchdog.md). Serves every host with a watchdog; a level entry names no port.
    ``power_timeout_s`` must exceed msgwait."""

    # At least twice the host's reported watchdog timeout; 0: exactly that.
    msgwait_s: Seconds = 0.0
    power_timeout_s: PositiveSeconds = 60.0
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 0


Device = SimDevice | IpmiDevice | ApcSnmpDevice | RedfishDevice | FenceAgentDevice | WatchdogDevice
DRIVERS = ("sim", "ipmi", "apc_snmp", "redfish", "agent", "watchdog")


class LevelDevice(_Section):
    device: Name
    # The target on the device: an outlet number, a BMC's own host, a sim port.
    port: str = ""


class FenceLevel(_Section):
    devices: Annotated[list[LevelDevice], msgspec.Meta(min_length=1)]


class HostConfig(_Section):
    name: Name
    memory_mb: Annotated[int, msgspec.Meta(ge=1)]
    vcpus: Annotated[int, msgspec.Meta(ge=1)] = 8
    levels: list[FenceLevel] = []
    maintenance: bool = False
    labels: list[str] = []
    # The host's watchdog device ("/dev/watchdog"); empty: none (docs/watchdog.md).
    watchdog: str = ""


class VmConfig(_Section):
    name: Name
    host: Name
    memory_mb: Annotated[int, msgspec.Meta(ge=1)]
    vcpus: Annotated[int, msgspec.Meta(ge=1)] = 1
    ha: bool = False
    uuid: str = ""
    priority: Literal["high", "medium", "low"] = "medium"
    affinity: list[Name] = []
    anti_affinity: list[Name] = []
    labels: list[str] = []
    # Path of the libvirt domain XML on shared storage (libvirt driver).
    definition: str = ""
    # VM-level HA overrides of [scheduler] (unset: the section's value).
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] | None = None
    restart_on_guest_shutdown: bool | None = None

    def spec(self) -> VmSpec:
        return VmSpec(name=self.name, memory_mb=self.memory_mb, vcpus=self.vcpus, ha=self.ha, uuid=self.uuid,
                      priority=self.priority, affinity=self.affinity, anti_affinity=self.anti_affinity,
                      labels=self.labels, definition=self.definition)


class ClusterConfig(_Section):
    cluster: ClusterSection = ClusterSection()
    nats: NatsSection = NatsSection()
    timings: Timings = Timings()
    telemetry: TelemetrySection = TelemetrySection()
    store: StoreSection = StoreSection()
    arbiter: ArbiterSection = ArbiterSection()
    fencer: FencerSection = FencerSection()
    storage: StorageSection = StorageSection()
    metrics: MetricsSection = MetricsSection()
    scheduler: SchedulerSection = SchedulerSection()
    agent: AgentSection = AgentSection()
    devices: dict[Name, Device] = {}
    hosts: list[HostConfig] = []
    vms: list[VmConfig] = []

    def host(self, name: str) -> HostConfig:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"host {name!r} is not in the configuration")

    def vms_of(self, host: str) -> list[VmConfig]:
        return [vm for vm in self.vms if vm.host == host]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    key: str
    message: str


class ConfigError(Exception):
    """The configuration file is wrong; the message names the file and each key."""

    def __init__(self, path: str, issues: list[ConfigIssue]) -> None:
        self.path = path
        self.issues = issues
        lines = [f"{path}: {issue.key}: {issue.message}" for issue in issues]
        super().__init__("invalid configuration\n  " + "\n  ".join(lines))


_AT_RE = re.compile(r"^(?P<msg>.*?)(?: - at `(?P<at>[^`]*)`)?$", re.S)


def _msgspec_issue(err: msgspec.ValidationError) -> ConfigIssue:
    match = _AT_RE.match(str(err))
    assert match is not None
    at = match.group("at") or "$"
    key = at.removeprefix("$").removeprefix(".") or "(top level)"
    return ConfigIssue(key, match.group("msg"))


def parse_config(text: str, path: str = "<config>") -> ClusterConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [ConfigIssue("(syntax)", f"not valid TOML: {err}")]) from None
    issues = _section_issues(raw)
    if issues:
        raise ConfigError(path, issues)
    try:
        config = msgspec.convert(raw, ClusterConfig, strict=True)
    except msgspec.ValidationError as err:
        raise ConfigError(path, [_msgspec_issue(err)]) from None
    issues = check_consistency(config)
    if issues:
        raise ConfigError(path, issues)
    return config


def _section_issues(raw: dict[str, object]) -> list[ConfigIssue]:
    """Check each section, device, host and VM on its own, so that one pass reports
    every structural error with its full key (msgspec stops at the first)."""
    issues: list[ConfigIssue] = []

    def check(value: object, kind: object, key: str) -> None:
        try:
            msgspec.convert(value, kind, strict=True)
        except msgspec.ValidationError as err:
            issue = _msgspec_issue(err)
            if key.startswith("devices.") and issue.key == "driver":
                issue = ConfigIssue("driver", f"{issue.message}: use one of {', '.join(DRIVERS)}")
            issues.append(ConfigIssue(key + ("" if issue.key == "(top level)" else f".{issue.key}"), issue.message))

    known = {f.name: f.type for f in msgspec.structs.fields(ClusterConfig)}
    for section, value in raw.items():
        if section not in known:
            issues.append(ConfigIssue(section, f"unknown section (known: {', '.join(sorted(known))})"))
        elif section == "devices" and isinstance(value, dict):
            for name, table in value.items():
                check(table, Device, f"devices.{name}")
        elif section in ("hosts", "vms") and isinstance(value, list):
            kind = HostConfig if section == "hosts" else VmConfig
            for i, item in enumerate(value):
                check(item, kind, f"{section}[{i}]")
        else:
            check(value, known[section], section)
    return issues


def load_config(path: str | os.PathLike[str]) -> ClusterConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(str(p), [ConfigIssue("(file)", f"cannot read: {err.strerror}")]) from None
    return parse_config(text, str(p))


def has_ports(device: Device) -> bool:
    """Whether a level entry's ``port`` chooses what the device powers: an outlet,
    a plug, a sim port. A BMC (ipmi, redfish) powers exactly one machine."""
    match device:
        case IpmiDevice() | RedfishDevice() | WatchdogDevice():
            return False
        case FenceAgentDevice():
            return bool(device.port_option)
    return True


_OUTLET_RE = re.compile(r"(?:(\d+):)?(\d+)")


def power_target(name: str, device: Device, port: str, host: str) -> tuple[object, ...]:
    """What a level entry really switches, as one key: the same machine or outlet
    reached through two device names (or two spellings of an outlet) is one target."""
    match device:
        case IpmiDevice():
            return ("ipmi", device.address.lower(), device.port)
        case RedfishDevice():
            return ("redfish", device.address.lower(), device.port, device.system_id)
        case ApcSnmpDevice():
            m = _OUTLET_RE.fullmatch(port)
            outlet = (int(m.group(1) or 1), int(m.group(2))) if m else port
            return ("apc_snmp", device.address.lower(), device.port, outlet)
        case SimDevice():
            return ("sim", device.state_dir, port or host)
        case FenceAgentDevice():
            return ("agent", name, port or host) if device.port_option else ("agent", name)
        case WatchdogDevice():
            return ("watchdog", host)  # the host's own slot: never another host's
    return (name, port or host)


def check_power_targets(config: ClusterConfig) -> list[ConfigIssue]:
    """The right host: every level entry names an existing device, a port only
    where the device has ports (a BMC's port was silently ignored), an outlet
    where it needs one, and no two hosts share a target (a copy-pasted BMC
    fences the wrong host)."""
    issues: list[ConfigIssue] = []
    owner: dict[tuple[object, ...], tuple[str, str]] = {}
    for i, host in enumerate(config.hosts):
        for j, level in enumerate(host.levels):
            for k, ref in enumerate(level.devices):
                key = f"hosts[{i}].levels[{j}].devices[{k}]"
                device = config.devices.get(ref.device)
                if device is None:
                    issues.append(ConfigIssue(f"{key}.device",
                                              f"unknown power device {ref.device!r} (not in [devices])"))
                    continue
                driver = type(device).__struct_config__.tag
                if ref.port and not has_ports(device):
                    issues.append(ConfigIssue(f"{key}.port", (
                        f"device {ref.device!r} ({driver}) powers one machine and has no ports; port "
                        f"{ref.port!r} would be ignored: remove it, or name the device of this host's own BMC")))
                    continue
                if isinstance(device, ApcSnmpDevice) and not _OUTLET_RE.fullmatch(ref.port):
                    issues.append(ConfigIssue(f"{key}.port", (
                        f"device {ref.device!r} (apc_snmp) needs the host's outlet: a number or switch:number, "
                        f"not {ref.port!r}")))
                    continue
                target = power_target(ref.device, device, ref.port, host.name)
                first = owner.setdefault(target, (host.name, key))
                if first[0] != host.name:
                    what = (f"device {ref.device!r} ({driver}) powers one machine" if not has_ports(device)
                            else f"port {ref.port or host.name!r} of device {ref.device!r} ({driver})")
                    issues.append(ConfigIssue(key, (
                        f"{what} is already the fence target of host {first[0]!r} ({first[1]}): fencing host "
                        f"{host.name!r} would power off {first[0]!r}; each host needs its own BMC or outlet")))
    return issues


def worst_fence_s(config: ClusterConfig, host: HostConfig) -> float:
    """How long the fencer may take for ``host`` when every level fails: each level
    waits for its slowest device, every command retried, then the next level."""
    total = 0.0
    for level in host.levels:
        total += max(((1 + d.retries) * (d.power_wait_s + d.power_timeout_s)
                      for ref in level.devices if (d := config.devices.get(ref.device)) is not None), default=0.0)
    return total * (2 if config.arbiter.action == "reboot" else 1)


def check_watchdog(config: ClusterConfig) -> list[ConfigIssue]:
    """A watchdog level works only with slots on shared storage, a watchdog on the
    host, intervals that let a pill be obeyed inside msgwait, and a device timeout
    longer than msgwait (docs/watchdog.md)."""
    issues: list[ConfigIssue] = []
    st = config.storage
    half = st.watchdog_timeout_s / 2
    if st.slot_dir and st.slot_interval_s > half:
        issues.append(ConfigIssue("storage.slot_interval_s", (
            f"{st.slot_interval_s:g}s is more than half of watchdog_timeout_s ({st.watchdog_timeout_s:g}s): "
            "a host could feed its watchdog on a check older than msgwait allows")))
    if st.slot_dir and st.view_max_age_s > half:
        issues.append(ConfigIssue("storage.view_max_age_s", (
            f"{st.view_max_age_s:g}s is more than half of watchdog_timeout_s ({st.watchdog_timeout_s:g}s): "
            "a host without storage could feed its watchdog on a view older than msgwait allows")))
    for i, host in enumerate(config.hosts):
        for j, level in enumerate(host.levels):
            for k, ref in enumerate(level.devices):
                device = config.devices.get(ref.device)
                if not isinstance(device, WatchdogDevice):
                    continue
                key = f"hosts[{i}].levels[{j}].devices[{k}]"
                if not st.slot_dir:
                    issues.append(ConfigIssue(key, f"device {ref.device!r} (watchdog) needs [storage] slot_dir"))
                if not host.watchdog:
                    issues.append(ConfigIssue(f"hosts[{i}].watchdog", (
                        f"host {host.name!r} has a watchdog level but no watchdog device (e.g. \"/dev/watchdog\")")))
                msgwait = max(device.msgwait_s, 2 * st.watchdog_timeout_s)
                if device.power_timeout_s <= msgwait + st.slot_interval_s:
                    issues.append(ConfigIssue(f"devices.{ref.device}.power_timeout_s", (
                        f"{device.power_timeout_s:g}s cannot see msgwait ({msgwait:g}s) pass: make it more than "
                        f"{msgwait + st.slot_interval_s:g}s")))
    return issues


def check_consistency(config: ClusterConfig) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = check_power_targets(config)
    issues += check_watchdog(config)
    seen_hosts: set[str] = set()
    for i, host in enumerate(config.hosts):
        if host.name in seen_hosts:
            issues.append(ConfigIssue(f"hosts[{i}].name", f"host {host.name!r} is defined twice"))
        seen_hosts.add(host.name)
    seen_vms: set[str] = set()
    for i, vm in enumerate(config.vms):
        if vm.name in seen_vms:
            issues.append(ConfigIssue(f"vms[{i}].name", f"VM {vm.name!r} is defined twice"))
        seen_vms.add(vm.name)
        if vm.host not in seen_hosts:
            issues.append(ConfigIssue(f"vms[{i}].host", f"unknown host {vm.host!r} (not in [[hosts]])"))
    return issues


def read_secret(file: str, env: str, what: str) -> str:
    """Read a secret from a file or an environment variable, never from the config."""
    if file:
        try:
            return Path(file).read_text().strip()
        except OSError as err:
            raise ConfigError(file, [ConfigIssue(what, f"cannot read secret file: {err.strerror}")]) from None
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError("(environment)", [ConfigIssue(what, f"environment variable {env} is not set")])
        return value
    return ""
