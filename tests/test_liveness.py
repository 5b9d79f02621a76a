import pytest

from hafence.heartbeat.liveness import Alive, Liveness, Suspect, UnknownHost


def make(now: float = 0.0) -> Liveness:
    return Liveness(["a", "b"], interval=1.0, missed=3, now=now)


def test_a_host_that_misses_k_intervals_becomes_suspect_once() -> None:
    live = make()
    live.heartbeat("a", "boot1", 0, now=0.5)
    live.heartbeat("b", "boot2", 0, now=0.5)
    assert live.tick(3.4) == []
    live.heartbeat("b", "boot2", 1, now=3.0)
    out = live.tick(3.6)
    assert out == [Suspect("a", "a-boot1-0", 0.5, pytest.approx(3.1))]
    assert live.tick(10.0) == [Suspect("b", "b-boot2-1", 3.0, 7.0)]
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
    assert all(s.incident.endswith("never-seen") for s in out)


def test_incident_ids_are_the_same_on_every_replica() -> None:
    r1, r2 = make(0.0), make(0.2)
    for r in (r1, r2):
        r.heartbeat("a", "bootX", 7, now=1.0)
        r.heartbeat("b", "bootY", 7, now=1.0)
    assert [s.incident for s in r1.tick(9.0)] == [s.incident for s in r2.tick(9.1)]


def test_unknown_hosts_are_reported() -> None:
    with pytest.raises(UnknownHost):
        make().heartbeat("zz", "b", 0, now=0.0)
