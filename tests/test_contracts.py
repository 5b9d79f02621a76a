import msgspec
import pytest

from hafence.contracts import (
    Decoders,
    DeviceEvidence,
    FenceRequest,
    FenceResult,
    Heartbeat,
    HostEvent,
    Inventory,
    VmInfo,
    VmSpec,
    VmStart,
    encode,
)
from hafence.subjects import InvalidName, Subjects, check_name


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "has space", "", "-lead", "x" * 64, "tab\t", "new\nline"])
def test_names_that_would_break_a_subject_are_refused(bad: str) -> None:
    with pytest.raises(InvalidName, match="invalid host name"):
        Subjects().hb(bad)


@pytest.mark.parametrize("good", ["lab-1", "node_07", "A", "x" * 63])
def test_ordinary_names_pass(good: str) -> None:
    assert check_name("host", good) == good


def test_subjects_follow_the_design_table() -> None:
    s = Subjects("hafence")
    assert s.hb("h1") == "hafence.hb.h1"
    assert s.inventory("h1") == "hafence.inventory.h1"
    assert s.host_event("h1", "suspect") == "hafence.host.h1.suspect"
    assert s.fence_request("h1") == "hafence.fence.request.h1"
    assert s.fence_result("h1") == "hafence.fence.result.h1"
    assert s.vm_event("vm1", "started") == "hafence.vm.vm1.started"
    assert s.agent_cmd("h1") == "hafence.agent.h1.cmd"
    assert s.dlq("fencer") == "hafence.dlq.fencer"
    with pytest.raises(ValueError):
        s.host_event("h1", "exploded")
    with pytest.raises(InvalidName):
        Subjects("bad prefix")


def test_every_message_round_trips_and_carries_its_version() -> None:
    spec = VmSpec(name="vm1", memory_mb=1024, vcpus=2, ha=True)
    messages = [
        Heartbeat(host="h1", boot_id="b", seq=1, sent_at=1.0),
        Inventory(host="h1", boot_id="b", memory_mb=1, vcpus=1, vms=[VmInfo(spec=spec, state="running")],
                  sent_at=1.0),
        HostEvent(host="h1", kind="suspect", at=1.0, incident="i"),
        FenceRequest(request_id="r", incident="i", host="h1", term=3, requested_at=1.0),
        FenceResult(request_id="r", incident="i", host="h1", term=3, outcome="confirmed_off", started_at=1.0,
                    finished_at=2.0, evidence=[DeviceEvidence(device="d", driver="sim", level=1,
                                                              action_sent="off", power_read="off",
                                                              confirmed=True)]),
        VmStart(vm=spec, incident="i"),
    ]
    for msg in messages:
        raw = encode(msg)
        assert msgspec.json.decode(raw)["v"] == 1
        assert Decoders.any.decode(raw) == msg


def test_decoding_is_strict_and_tagged() -> None:
    with pytest.raises(msgspec.ValidationError, match="Expected `int`, got `str`"):
        Decoders.heartbeat.decode(b'{"type":"heartbeat","host":"h1","boot_id":"b","seq":"1","sent_at":1.0}')
    # A message of another type is not silently read as this one.
    event = encode(HostEvent(host="h1", kind="alive", at=1.0))
    with pytest.raises(msgspec.ValidationError):
        Decoders.fence_request.decode(event)
    # A name that would break a subject does not get past the decoder.
    with pytest.raises(msgspec.ValidationError, match="host"):
        Decoders.heartbeat.decode(b'{"type":"heartbeat","host":"h.1","boot_id":"b","seq":1,"sent_at":1.0}')


def test_unknown_fields_are_tolerated_for_forward_compatibility() -> None:
    raw = b'{"type":"heartbeat","v":2,"host":"h1","boot_id":"b","seq":1,"sent_at":1.0,"new_field":[1]}'
    assert Decoders.heartbeat.decode(raw).v == 2


def test_fence_request_term_must_be_positive() -> None:
    with pytest.raises(msgspec.ValidationError, match="term"):
        Decoders.fence_request.decode(
            b'{"type":"fence_request","request_id":"r","incident":"i","host":"h1","term":0,"requested_at":1}'
        )
