"""S5: the subject says what a message is. Unit tests of the route table and the
bounds checked before decoding (the forgeries of issue 10, item 1)."""

from __future__ import annotations

import re
import time

import msgspec
import pytest

from hafence.bus.dead_letters import kept_headers
from hafence.contracts import (
    MAX_PLACEMENTS,
    Alert,
    DeadLetter,
    Decoders,
    FenceRequest,
    FenceResult,
    Heartbeat,
    HostEvent,
    Inventory,
    Message,
    MonitorView,
    Placements,
    VmEvent,
    VmInfo,
    VmSpec,
    VmStart,
    VmStop,
    encode,
)
from hafence.routes import (
    MAX_MESSAGE_BYTES,
    MAX_NESTING,
    ROUTES,
    Routes,
    Violation,
    accepted_types,
    nesting_exceeds,
)
from hafence.slots import view_subject
from hafence.subjects import HOST_EVENT_KINDS, VM_EVENT_KINDS, InvalidName, Subjects, check_name

R = Routes.for_prefix("hafence")
S = Subjects("hafence")
SCHEDULER = accepted_types(Decoders.scheduler_input)
ARBITER = accepted_types(Decoders.arbiter_input)


def confirmed_off(host: str) -> FenceResult:
    return FenceResult(request_id="r", incident="i", host=host, term=9, outcome="confirmed_off",
                       started_at=1.0, finished_at=2.0)


def inventory(host: str) -> Inventory:
    spec = VmSpec(name="vm-a", memory_mb=1024, ha=True)
    return Inventory(host=host, boot_id="b", memory_mb=1, vcpus=1, vms=[VmInfo(spec=spec, state="running")],
                     sent_at=1.0)


def decode(subject: str, message: Message | bytes, accepts: tuple[type[Message], ...] | None = None) -> Message:
    return R.decode(subject, message if isinstance(message, bytes) else encode(message), accepts)


# -- the forgeries of issue 10 item 1: each was taken by the scheduler on main ------------

def test_a_fence_result_on_an_agents_inventory_subject_is_refused() -> None:
    # An agent may publish on inventory.<its host>; it forged a confirmed_off of another, live host.
    with pytest.raises(Violation, match=r"FenceResult on hafence\.inventory\.h1, which carries only Inventory"):
        decode("hafence.inventory.h1", confirmed_off("h2"), SCHEDULER)
    # The old path: the scheduler's union decoder took it by its tag.
    assert isinstance(Decoders.scheduler_input.decode(encode(confirmed_off("h2"))), FenceResult)


def test_an_operator_confirmation_on_an_inventory_subject_is_refused() -> None:
    forged = HostEvent(host="h2", kind="confirmed_fenced", at=1.0, by="operator")
    for accepts in (SCHEDULER, None):
        with pytest.raises(Violation, match=re.escape("a HostEvent on hafence.inventory.h1, which carries only")):
            decode("hafence.inventory.h1", forged, accepts)
    with pytest.raises(Violation, match=re.escape("HostEvent or FenceResult (the body claims to be a HostEvent")):
        decode("hafence.inventory.h1", forged, ARBITER)


def test_the_host_in_the_payload_must_be_the_subjects() -> None:
    cases: list[tuple[str, Message]] = [
        ("hafence.inventory.h1", inventory("h2")),
        ("hafence.hb.h1", Heartbeat(host="h2", boot_id="b", seq=1, sent_at=1.0)),
        ("hafence.host.h1.suspect", HostEvent(host="h2", kind="suspect", at=1.0)),
        ("hafence.fence.request.h1", FenceRequest(request_id="r", incident="i", host="h2", term=1,
                                                  requested_at=1.0)),
        ("hafence.fence.result.h1", confirmed_off("h2")),
        ("hafence.vm.vm-a.started", VmEvent(vm="vm-b", kind="started", at=1.0)),
        ("hafence.dlq.fencer", DeadLetter(service="agent", subject="x", error="e", raw=b"", at=1.0)),
    ]
    for subject, message in cases:
        with pytest.raises(Violation, match=r"\(the subject's (host|vm|service) is"):
            decode(subject, message)


def test_the_kind_in_the_payload_must_be_the_subjects() -> None:
    with pytest.raises(Violation, match=re.escape("kind 'confirmed_fenced' on hafence.host.h1.alive")):
        decode("hafence.host.h1.alive", HostEvent(host="h1", kind="confirmed_fenced", at=1.0), ARBITER)
    with pytest.raises(Violation, match="kind 'started'"):
        decode("hafence.vm.vm-a.failed", VmEvent(vm="vm-a", kind="started", at=1.0))
    with pytest.raises(Violation, match="kind 'storm'"):
        decode("hafence.alert.overload", Alert(kind="storm", at=1.0, service="arbiter", reason="r"))
    # A kind no contract knows: no payload can claim it.
    with pytest.raises(Violation):
        decode("hafence.host.h1.exploded", HostEvent(host="h1", kind="alive", at=1.0))


def test_what_the_subject_carries_is_what_decodes() -> None:
    event = HostEvent(host="h1", kind="confirmed_fenced", at=1.0, by="ops")
    assert decode("hafence.host.h1.confirmed_fenced", event, SCHEDULER) == event
    assert decode("hafence.fence.result.h1", confirmed_off("h1"), ARBITER) == confirmed_off("h1")
    assert decode("hafence.agent.h1.cmd", VmStop(vm="vm-a")) == VmStop(vm="vm-a")
    start = VmStart(vm=VmSpec(name="vm-a", memory_mb=1))
    assert decode("hafence.agent.h1.cmd", start, (VmStart, VmStop)) == start
    # The type comes from the subject: a body without its tag is read as what the subject carries.
    raw = msgspec.json.encode({"host": "h1", "boot_id": "b", "seq": 1, "sent_at": 1.0})
    assert decode("hafence.hb.h1", raw) == Heartbeat(host="h1", boot_id="b", seq=1, sent_at=1.0)


def test_a_consumer_takes_only_what_it_states() -> None:
    # The scheduler states Inventory | HostEvent | FenceResult: a VmEvent is not for it.
    with pytest.raises(Violation, match=re.escape("hafence.vm.vm-a.started carries VmEvent; this consumer accepts")):
        decode("hafence.vm.vm-a.started", VmEvent(vm="vm-a", kind="started", at=1.0), SCHEDULER)
    with pytest.raises(Violation, match="carries VmStart or VmStop"):
        decode("hafence.agent.h1.cmd", VmStop(vm="vm-a"), (Heartbeat,))


def test_a_subject_outside_the_table_carries_nothing() -> None:
    for subject in ("hafence.nope.h1", "other.hb.h1", "hafence.hb.h1.extra", "hafence.fence.h1",
                    "hafencex.hb.h1", "hafence"):
        with pytest.raises(Violation, match="no hafence message travels on"):
            decode(subject, Heartbeat(host="h1", boot_id="b", seq=1, sent_at=1.0))


def test_a_wrong_tag_names_the_type_it_claims() -> None:
    with pytest.raises(Violation, match=r"undecodable message: .* \(a 'bogus' on hafence.hb.h1"):
        decode("hafence.hb.h1", b'{"type":"bogus","host":"h1","boot_id":"b","seq":1,"sent_at":1}')


def test_every_subject_the_project_builds_has_a_route_for_its_message() -> None:
    built: list[tuple[str, Message]] = [
        (S.hb("h1"), Heartbeat(host="h1", boot_id="b", seq=1, sent_at=time.time())),
        (S.inventory("h1"), inventory("h1")),
        (S.fence_request("h1"), FenceRequest(request_id="r", incident="i", host="h1", term=1, requested_at=1.0)),
        (S.fence_result("h1"), confirmed_off("h1")),
        (S.agent_cmd("h1"), VmStop(vm="vm-a")),
        (S.alert("overload"), Alert(kind="overload", at=1.0, service="heartbeat", reason="r")),
        (S.dlq("fencer"), DeadLetter(service="fencer", subject="x", error="e", raw=b"\0", at=1.0)),
        (view_subject(S, "h1"), MonitorView(host="h1", term=1, at=1.0)),
        (S.placement_record("r0-1a2b3c4d"), Placements(at=1.0, placed=[VmEvent(vm="vm-a", kind="placed", at=1.0)])),
    ]
    built += [(S.host_event("h1", k), HostEvent(host="h1", kind=k, at=1.0)) for k in HOST_EVENT_KINDS]  # type: ignore[arg-type]
    built += [(S.vm_event("vm-a", k), VmEvent(vm="vm-a", kind=k, at=1.0)) for k in VM_EVENT_KINDS]  # type: ignore[arg-type]
    for subject, message in built:
        assert R.check(subject, message) is None, subject
        assert decode(subject, message) == message
    # Every type in the table has a builder above (no route the project cannot use).
    assert {t for r in ROUTES for t in r.types} <= {type(m) for _, m in built} | {VmStart}


def test_check_is_the_cheap_form_for_the_heartbeat_path() -> None:
    hb = Heartbeat(host="h1", boot_id="b", seq=1, sent_at=1.0)
    assert R.check("hafence.hb.h1", hb) is None
    assert R.check("hafence.hb.h2", hb) == "a Heartbeat with host 'h1' on hafence.hb.h2 (the subject's host is 'h2')"
    assert R.check("hafence.inventory.h1", hb) == "a Heartbeat on hafence.inventory.h1, which carries only Inventory"


# -- names: a full match (`$` matched before a final newline) ----------------------------

@pytest.mark.parametrize("bad", ["vm-c\n", "h1\n", "h1\r\n", "\nh1"])
def test_a_name_with_a_newline_is_refused_everywhere(bad: str) -> None:
    with pytest.raises(InvalidName):
        check_name("VM", bad)
    spec = msgspec.json.encode({"name": bad, "memory_mb": 1})
    with pytest.raises(msgspec.ValidationError, match="regex"):
        msgspec.json.decode(spec, type=VmSpec)
    raw = msgspec.json.encode({"type": "heartbeat", "host": bad, "boot_id": "b", "seq": 1, "sent_at": 1.0})
    with pytest.raises(Violation, match="undecodable message"):
        decode("hafence.hb.h1", raw)


# -- bounds before decoding ---------------------------------------------------------------

def test_deep_nesting_is_refused_before_msgspec_recurses() -> None:
    deep = b'{"type":"heartbeat","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RecursionError):  # what stopped the heartbeat service on main
        Decoders.heartbeat.decode(deep)
    with pytest.raises(Violation, match=f"nested deeper than {MAX_NESTING} levels"):
        decode("hafence.hb.h1", deep)
    assert nesting_exceeds(b"[" * (MAX_NESTING + 1) + b"]" * (MAX_NESTING + 1))
    assert not nesting_exceeds(b"[" * MAX_NESTING + b"]" * MAX_NESTING)
    # Brackets inside strings (escaped quotes too) are not structure.
    text = msgspec.json.encode({"reason": '[[[[{{{{"\\' * 50})
    assert not nesting_exceeds(text, 4)


def test_the_largest_legitimate_inventory_fits_and_an_oversized_body_does_not() -> None:
    vms = [VmInfo(spec=VmSpec(name=f"vm-production-database-{i:04d}", memory_mb=16384, vcpus=8, ha=True,
                              uuid="6f1c5a3e-2b1d-4c1e-9f2a-1234567890ab", priority="high",
                              affinity=["group-a-long-name"], anti_affinity=["anti-group-b"], labels=["ssd", "gpu"]),
                  state="running") for i in range(1000)]
    big = Inventory(host="h1", boot_id="b", memory_mb=1 << 20, vcpus=256, labels=["ssd"], vms=vms, sent_at=1.0)
    raw = encode(big)
    assert len(raw) < MAX_MESSAGE_BYTES  # a host with 1,000 VMs
    assert decode("hafence.inventory.h1", raw, SCHEDULER) == big
    over = raw[:-1] + b"," + b" " * (MAX_MESSAGE_BYTES - len(raw)) + b"}"
    with pytest.raises(Violation, match=f"larger than the limit of {MAX_MESSAGE_BYTES}"):
        decode("hafence.inventory.h1", over)


@pytest.mark.parametrize("body", [
    b"", b"\xff\xfe{", b"null", b"[]", b"{}", b'{"type":"heartbeat"}',
    b'{"type":"heartbeat","host":"h1","boot_id":"b","seq":1e999,"sent_at":1}',
    b'{"type":"heartbeat","host":"h1","boot_id":"b","seq":123456789012345678901234567890,"sent_at":1}',
    b'{"type":"heartbeat","host":"h1","boot_id":"b","seq":' + b"9" * 100_000 + b',"sent_at":1}',
    b'{"type":"heartbeat","host":"h1","boot_id":1,"seq":1,"sent_at":1}',
])
def test_hostile_bodies_are_violations_never_other_errors(body: bytes) -> None:
    for subject in ("hafence.hb.h1", "hafence.inventory.h1", "hafence.agent.h1.cmd"):
        with pytest.raises(Violation):
            decode(subject, body)


def test_a_dead_letter_never_carries_headers_that_steer_the_dlq() -> None:
    headers = {"Nats-Expected-Stream": "NOPE", "nats-msg-id": "x", "Nats-Expected-Last-Sequence": "3",
               "traceparent": "00-abc-def-01", "bad key": "v", "X-Long": "é" * 1000}
    kept = kept_headers(headers)
    assert set(kept) == {"traceparent", "X-Long"}
    assert kept["X-Long"].isascii() and len(kept["X-Long"]) <= 256


def placements(count: int, kind: str = "placed") -> bytes:
    placed = [VmEvent(vm=f"vm-{i}", kind="placed", at=1.0, target="h2") for i in range(count)]
    raw = encode(Placements(at=1.0, placed=placed))
    return raw if kind == "placed" else raw.replace(b'"kind":"placed"', f'"kind":"{kind}"'.encode(), 1)


def test_a_placement_record_carries_placed_vm_events_only_and_a_bounded_number() -> None:
    """A record is what a takeover reads as "asked there" (S0): nothing else may ride in
    it, and not so many that it misses the body limit."""
    subject = S.placement_record("r7-0000beef")
    assert len(decode(subject, placements(3), (*SCHEDULER, Placements)).placed) == 3  # type: ignore[attr-defined]
    with pytest.raises(Violation, match="carries only 'placed' VM events, not 'started'"):
        decode(subject, placements(3, kind="started"))
    with pytest.raises(Violation, match="undecodable message"):
        decode(subject, placements(0))
    with pytest.raises(Violation, match="undecodable message"):
        decode(subject, placements(MAX_PLACEMENTS + 1))
    assert len(placements(MAX_PLACEMENTS)) < MAX_MESSAGE_BYTES  # the largest record fits


def test_a_placement_record_subject_is_not_a_vms_and_a_vm_event_is_not_a_record() -> None:
    """Four tokens after the prefix: a VM named ``placements`` has its events on
    ``vm.placements.<kind>``, which the records' filter does not match."""
    assert S.placement_records() == "hafence.vm.placements.record.*"
    event = VmEvent(vm="placements", kind="started", at=1.0)
    assert decode(S.vm_event("placements", "started"), event) == event
    with pytest.raises(Violation, match="carries only Placements"):
        decode(S.placement_record("r1-00000001"), event)
    with pytest.raises(InvalidName):
        S.placement_record("r1.x")
