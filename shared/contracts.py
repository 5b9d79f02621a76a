"""The wire contracts: every message on the bus, as frozen msgspec Structs.

Rules (see msgspec's schema-evolution notes):

* each message has a tag (field ``type``) and a schema version ``v``;
* new fields get defaults; a field's type never changes; a breaking change is a
  new tag;
* decoding is strict (no int-for-str coercion) but unknown fields are allowed, so
  an older service can read a newer producer's message;
* host and VM names are validated by the decoder itself, so a name that would
  break a subject never gets past the edge.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# A host or VM name is one subject token. \A and \Z, not ^ and $: "$" also matches
# before a final newline, and msgspec's pattern is a search, so "vm-c\n" would pass.
NAME_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z"

Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
# Integers fit in 64 bits: a 100-bit term or sequence number decodes in Python but
# breaks SQLite (OverflowError) and every peer in another language.
_I64 = 2**63 - 1
Int = Annotated[int, msgspec.Meta(ge=-_I64 - 1, le=_I64)]
Count = Annotated[int, msgspec.Meta(ge=0, le=_I64)]
MiB = Count
PowerState = Literal["on", "off", "unknown"]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    v: Int = 1


class Heartbeat(Message, tag="heartbeat", kw_only=True):
    host: Name
    boot_id: str
    seq: Count
    sent_at: float


Priority = Literal["high", "medium", "low"]


class VmSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What it takes to start a VM on any host that can reach its storage."""

    name: Name
    memory_mb: MiB
    vcpus: Annotated[int, msgspec.Meta(ge=1, le=_I64)] = 1
    ha: bool = False
    uuid: str = ""
    priority: Priority = "medium"
    # VMs sharing an affinity group run on one host; sharing an anti-affinity group, never.
    affinity: list[Name] = []
    anti_affinity: list[Name] = []
    # Host labels the VM needs (e.g. "ssd", "gpu").
    labels: list[str] = []
    # libvirt domain XML (on shared storage), for a host that never ran the VM.
    definition: str = ""


# Why a VM is not running, as its host's agent saw it stop (``VmInfo.stop_reason``). A
# failure is one the agent did not order: the scheduler restarts an HA VM after one
# (docs/vm-ha.md). A plain string on the wire, not a Literal: a newer agent's reason
# must not make an older scheduler refuse the whole inventory.
VM_FAILURES: tuple[str, ...] = ("crashed", "killed", "panicked", "guest_shutdown")
# Not failures: stopped by a hafence command, moved away by a migration, saved to disk,
# or stopped for a reason the hypervisor did not give (never restarted on a guess).
# "pill": stopped by the agent obeying a poison pill; its host is being fenced, and the
# fence's confirmation releases these VMs as it does the running ones (docs/watchdog.md).
VM_STOPS: tuple[str, ...] = ("command", "migrated", "saved", "other", "pill")
# Stops after which the fence of the host releases the VM for a restart elsewhere.
FENCE_STOPS: tuple[str, ...] = ("pill",)
StopReason = Annotated[str, msgspec.Meta(max_length=32)]


class VmInfo(msgspec.Struct, frozen=True, kw_only=True):
    spec: VmSpec
    state: Literal["running", "stopped"]
    # Stopped: why (VM_FAILURES or VM_STOPS; "" when the agent did not see it stop) and
    # when the agent saw it (its clock; with the host and boot, the failure's identity).
    stop_reason: StopReason = ""
    stopped_at: Seconds = 0.0


class Inventory(Message, tag="inventory", kw_only=True):
    host: Name
    boot_id: str
    memory_mb: MiB
    vcpus: Int
    labels: list[str] = []
    vms: list[VmInfo] = []
    sent_at: float
    # S6: a host that was fenced starts nothing on its own until it is cleared.
    quarantined: bool = False
    # Watchdog self-fencing (docs/watchdog.md): the agent's watchdog is armed, with
    # the timeout the device reports; ``pill``: a poison pill is in the host's slot
    # (it was fenced through it and starts nothing until `hafence host clear`).
    watchdog_armed: bool = False
    watchdog_timeout_s: Seconds = 0.0
    pill: bool = False
    # The host's monotonic clock when the VMs were listed. It runs for the whole boot,
    # across restarts of the agent, and no wall-clock step moves it: it orders one
    # boot's reports however late one is delivered (a client flushing what it buffered
    # while cut off). 0: not given (an agent of an older release): taken as it comes.
    listed_at: Seconds = 0.0


HostEventKind = Literal[
    "suspect",
    "alive",
    "fence_requested",
    "fence_skipped",
    "fenced",
    "fence_failed",
    "confirmed_fenced",
    "protected",
    "not_protected",
    "maintenance_on",
    "maintenance_off",
    "ha_reservation_lost",
    "ha_reservation_ok",
    # An operator clears a host that was fenced: it may take VMs again (S6).
    "cleared",
]


class HostEvent(Message, tag="host_event", kw_only=True):
    host: Name
    kind: HostEventKind
    at: float
    incident: str = ""
    reason: str = ""
    term: Int = 0
    last_seen: float | None = None
    # fence_requested: which request; fence_skipped: which rule, and whether a person must look.
    request_id: str = ""
    attempt: Int = 0
    rule: str = ""
    alert: bool = False
    # confirmed_fenced, maintenance_*, cleared: who said so (an operator's audit trail).
    by: str = ""
    # suspect, fence_*, fenced: the boot of the host the incident is about (S6:
    # a result is folded against that boot's inventory, not a later one).
    boot_id: str = ""
    # suspect: the other hosts the monitor had not heard from for 1.5 intervals when
    # it declared this one (lost together with it, about to be suspect too), so the
    # arbiter's storm guard sees them at once; None: not reported (a monitor taking
    # over re-announces suspects without it).
    late_hosts: list[Name] | None = None


class FenceRequest(Message, tag="fence_request", kw_only=True):
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    incident: str
    host: Name
    action: Literal["off", "reboot"] = "off"
    term: Annotated[int, msgspec.Meta(ge=1, le=_I64)]
    requested_at: float
    reason: str = ""
    boot_id: str = ""
    # "watchdog": only the host's watchdog levels (the isolation response "pill":
    # an isolated host resets itself through its slot); "topology": every level.
    method: Literal["topology", "watchdog"] = "topology"


class MonitorView(Message, tag="monitor_view", kw_only=True):
    """The heartbeat monitor's leader hears ``host`` (watchdog hosts only, every
    interval): without storage, an agent feeds its watchdog only while a recent
    view lists it, and the fencer's watchdog level waits until it is out of view."""

    host: Name
    term: Count
    at: float


class DeviceEvidence(msgspec.Struct, frozen=True, kw_only=True):
    """What one power device was told and what it said back."""

    device: str
    driver: str
    level: Int
    action_sent: str
    power_read: PowerState
    confirmed: bool
    status_reads: Int = 0
    elapsed_s: Seconds = 0.0
    error: str = ""


FenceOutcome = Literal["confirmed_off", "failed", "refused"]


class FenceResult(Message, tag="fence_result", kw_only=True):
    request_id: str
    incident: str
    host: Name
    term: Int
    outcome: FenceOutcome
    level: Int | None = None
    evidence: list[DeviceEvidence] = []
    reason: str = ""
    started_at: float
    finished_at: float
    boot_id: str = ""
    # The highest leader term the fencer has admitted (S3): on a refusal, the term
    # a new arbiter leader must exceed (terms never go back, even when the lease
    # bucket was lost and its revisions started again).
    highest_term: Count = 0


class VmStart(Message, tag="vm_start", kw_only=True):
    vm: VmSpec
    incident: str = ""


class VmStop(Message, tag="vm_stop", kw_only=True):
    vm: Name
    reason: str = ""


AgentCommand = VmStart | VmStop


class AgentReply(Message, tag="agent_reply", kw_only=True):
    host: Name
    vm: Name
    ok: bool
    state: Literal["running", "stopped", "unknown"]
    already: bool = False
    error: str = ""


VmEventKind = Literal[
    "placed", "started", "failed", "pending",
    # S0 watch: the VM is reported running on two hosts; the copy that must go was stopped.
    "duplicate", "stopped",
    # VM-level HA (docs/vm-ha.md): an HA VM failed on a live host (crashed, killed,
    # panicked, shut down by its guest), was restarted, or failed too often to be.
    "crashed", "restarted", "restart_limit",
]


class VmEvent(Message, tag="vm_event", kw_only=True):
    vm: Name
    kind: VmEventKind
    at: float
    incident: str = ""
    from_host: str = ""
    target: str = ""
    reason: str = ""


# Placements of one record at most: a wave sends at most its commands in flight at
# once (hafence.scheduler.core.COMMANDS_IN_FLIGHT), and a record of this many fits
# the largest body a subject may carry (hafence.routes.MAX_MESSAGE_BYTES) with room.
MAX_PLACEMENTS = 1024


class Placements(Message, tag="placements", kw_only=True):
    """The scheduler's record of where it is about to start VMs (a failover wave's
    batch, or one VM-level restart), stored before any of their ``VmStart`` leaves.

    Every record is a compare-and-set on the last sequence of all schedulers' records
    (``vm.placements.record.*``; the last one its writer read or wrote): a record is
    stored only if its writer had read every placement stored before it, so of two
    processes that both believe they lead only one starts anything (S0/S1).
    ``placed`` are ``VmEvent``s of kind ``placed``: what a per-VM ``placed`` event
    said before one record carried a whole batch (docs/scale.md)."""

    at: float
    placed: Annotated[list[VmEvent], msgspec.Meta(min_length=1, max_length=MAX_PLACEMENTS)]

    def __post_init__(self) -> None:
        for event in self.placed:
            if event.kind != "placed":
                raise ValueError(f"a placements record carries only 'placed' VM events, not {event.kind!r}")


class Alert(Message, tag="alert", kw_only=True):
    """Something a person must look at that is not one host's or VM's event
    (an overloaded monitor, a refused term, a fence past its deadline)."""

    kind: Name
    at: float
    service: str
    reason: str
    host: str = ""
    vm: str = ""
    term: Int = 0


class DeadLetter(Message, tag="dead_letter", kw_only=True):
    """A message a service could not decode or handle: kept (up to a bound), with the reason."""

    service: str
    subject: str
    error: str
    raw: bytes
    at: float
    # The original body's length; ``raw`` holds only its first bytes when it was larger
    # than a dead letter may carry (hafence.routes.MAX_DEAD_LETTER_RAW).
    size: int = 0
    truncated: bool = False


def encode(msg: msgspec.Struct) -> bytes:
    return _ENCODER.encode(msg)


_ENCODER = msgspec.json.Encoder()


class Decoders:
    """One decoder per channel, built once and reused (msgspec's perf advice)."""

    heartbeat = msgspec.json.Decoder(Heartbeat)
    inventory = msgspec.json.Decoder(Inventory)
    host_event = msgspec.json.Decoder(HostEvent)
    fence_request = msgspec.json.Decoder(FenceRequest)
    fence_result = msgspec.json.Decoder(FenceResult)
    agent_command = msgspec.json.Decoder(AgentCommand)
    agent_reply = msgspec.json.Decoder(AgentReply)
    vm_event = msgspec.json.Decoder(VmEvent)
    placements = msgspec.json.Decoder(Placements)
    alert = msgspec.json.Decoder(Alert)
    monitor_view = msgspec.json.Decoder(MonitorView)
    dead_letter = msgspec.json.Decoder(DeadLetter)
    scheduler_input = msgspec.json.Decoder(Inventory | HostEvent | FenceResult)
    arbiter_input = msgspec.json.Decoder(HostEvent | FenceResult)
    any = msgspec.json.Decoder(
        Heartbeat | Inventory | HostEvent | FenceRequest | FenceResult | VmStart | VmStop
        | AgentReply | VmEvent | Placements | Alert | DeadLetter | MonitorView
    )
