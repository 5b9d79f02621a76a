import pytest

from hafence.heartbeat.liveness import Alive, Liveness, Suspect, UnknownHost


def make(now: float = 0.0, nonce: str = "n1") -> Liveness:
    return Liveness(["a", "b"], interval=1.0, missed=3, now=now, nonce=nonce)


def test_a_host_that_misses_k_intervals_becomes_suspect_once() -> None:
    live = make()
    live.heartbeat("a", "boot1", 0, now=0.5)
    live.heartbeat("b", "boot2", 0, now=0.5)
    assert live.tick(3.4) == []
    live.heartbeat("b", "boot2", 1, now=3.0)
    out = live.tick(3.6)
    assert out == [Suspect("a", "a-boot1-0", 0.5, pytest.approx(3.1), "boot1")]
    assert live.tick(10.0) == [Suspect("b", "b-boot2-1", 3.0, 7.0, "boot2")]
    assert live.tick(11.0) == []


def test_a_heartbeat_after_suspicion_makes_the_host_alive_again() -> None:
    live = make()
    live.heartbeat("a", "x", 0, now=0.0)
    live.tick(5.0)
    assert live.heartbeat("a", "x", 1, now=5.1) == [Alive("a", was_suspect=True)]
    assert live.heartbeat("a", "x", 2, now=5.2) == []
    assert live.state("a") == "alive"


def test_start_up_grace_no_suspect_before_one_full_window() -> None:
    live = make(now=100.0)
    assert live.tick(102.9) == []
    out = live.tick(103.1)
    assert {s.host for s in out} == {"a", "b"}
    assert all(s.incident.endswith("never-seen-n1") for s in out)


def test_incident_ids_are_the_same_on_every_replica() -> None:
    r1, r2 = make(0.0), make(0.2)
    for r in (r1, r2):
        r.heartbeat("a", "bootX", 7, now=1.0)
        r.heartbeat("b", "bootY", 7, now=1.0)
    assert [s.incident for s in r1.tick(9.0)] == [s.incident for s in r2.tick(9.1)]


def test_unknown_hosts_are_reported() -> None:
    with pytest.raises(UnknownHost):
        make().heartbeat("zz", "b", 0, now=0.0)


def test_s4_a_host_silent_since_start_gets_a_new_incident_in_every_monitor_lifetime() -> None:
    """Before: ``<host>-never-seen`` in every lifetime, so the stream dropped the
    second suspicion as a duplicate and the fencer answered it from its journal."""
    first = make(now=0.0, nonce="lifetime1").tick(10.0)
    second = make(now=100.0, nonce="lifetime2").tick(110.0)
    assert {s.incident for s in first}.isdisjoint({s.incident for s in second})
    with pytest.raises(ValueError, match="nonce"):
        make(nonce="")


def test_a_replayed_heartbeat_neither_revives_a_host_nor_moves_its_incident_back() -> None:
    live = make()
    live.heartbeat("a", "boot1", 5, now=1.0)
    live.heartbeat("b", "boot2", 0, now=1.0)
    [first] = [s for s in live.tick(5.0) if s.host == "a"]
    assert live.heartbeat("a", "boot1", 3, now=5.5) == []  # old news of life
    assert live.state("a") == "suspect"
    live.heartbeat("a", "boot1", 6, now=6.0)
    [second] = [s for s in live.tick(10.0) if s.host == "a"]
    assert (first.incident, second.incident) == ("a-boot1-5", "a-boot1-6")
    # A new boot starts its sequence again: that is news.
    assert live.heartbeat("a", "boot9", 0, now=10.5) == [Alive("a", was_suspect=True)]


def test_an_agents_boot_id_cannot_break_a_message_id() -> None:
    live = make()
    live.heartbeat("a", "x\r\nNats-Msg-Id: forged " + "y" * 500, 1, now=0.0)
    [s] = [s for s in live.tick(5.0) if s.host == "a"]
    assert s.incident == "a-xNatsMsgIdforged-1"
