"""Watchdog self-fencing, unit level (docs/watchdog.md): the agent's feeding rule,
the fencer's watchdog driver on real slot files with a virtual clock, the Linux
device port, the config rules and the protection check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hafence.agent.watchdog import Check, LinuxWatchdog, feed_decision
from hafence.config import ConfigError, StorageSection, WatchdogDevice, parse_config
from hafence.contracts import DeviceEvidence, MonitorView
from hafence.fencer.drivers.base import DeviceError, DeviceUnreachable
from hafence.fencer.drivers.watchdog import ViewTracker, WatchdogContext, WatchdogDriver
from hafence.fencer.protection import protection
from hafence.slots import SlotRecord, Slots

T = 1.0  # the host's watchdog timeout
MAX_AGE = 0.5


# --- the agent's rule ------------------------------------------------------------

def test_a_fresh_clean_slot_check_feeds() -> None:
    assert feed_decision(10.0, Check(9.8, "clear"), False, None, T, MAX_AGE).feed


def test_a_pill_is_never_fed_whatever_the_view_says() -> None:
    d = feed_decision(10.0, Check(9.9, "clear"), True, 9.99, T, MAX_AGE)
    assert not d.feed and "pill" in d.reason


def test_without_storage_a_recent_view_feeds_and_an_old_one_does_not() -> None:
    check = Check(9.9, "unreachable", "slot directory gone")
    assert feed_decision(10.0, check, False, 9.7, T, MAX_AGE).feed
    d = feed_decision(10.0, check, False, 9.4, T, MAX_AGE)
    assert not d.feed and "no recent monitor view" in d.reason
    assert not feed_decision(10.0, check, False, None, T, MAX_AGE).feed


def test_a_clean_check_older_than_half_the_timeout_proves_nothing() -> None:
    """A read that hangs in the storage must not keep the host alive on an old answer."""
    assert not feed_decision(10.0, Check(9.4, "clear"), False, None, T, MAX_AGE).feed
    assert feed_decision(10.0, Check(9.4, "clear"), False, 9.8, T, MAX_AGE).feed  # the view still may


# --- the fencer's driver -----------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def world(tmp_path: Path) -> tuple[Slots, Clock, ViewTracker, WatchdogContext]:
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    clock = Clock()
    views = ViewTracker(clock=clock)
    storage = StorageSection(slot_dir=str(slot_dir), watchdog_timeout_s=T, slot_interval_s=0.25, view_max_age_s=0.5)
    return Slots(slot_dir), clock, views, WatchdogContext(storage, views)


def renew(slots: Slots, counter: int, armed: bool = True, boot: str = "b1") -> None:
    slots.write_record(SlotRecord(host="h1", boot_id=boot, counter=counter, armed=armed, timeout_s=T if armed else 0,
                                  interval_s=0.25, view_max_age_s=0.5))


def driver(ctx: WatchdogContext, clock: Clock) -> WatchdogDriver:
    return WatchdogDriver("sbd", WatchdogDevice(), "h1", ctx, clock=clock)


async def test_off_confirms_only_after_msgwait_since_the_pill(world) -> None:  # type: ignore[no-untyped-def]
    slots, clock, _, ctx = world
    renew(slots, 7)
    clock.now += 10  # the fencer has watched the views for a while
    d = driver(ctx, clock)
    await d.power_off()
    assert slots.pill("h1") is not None
    clock.now += 1.9
    assert await d.status() == "on"  # msgwait is 2 x 1 s
    clock.now += 0.2
    assert await d.status() == "off"


async def test_a_host_still_in_the_monitors_view_is_not_confirmed(world) -> None:  # type: ignore[no-untyped-def]
    slots, clock, views, ctx = world
    renew(slots, 7)
    clock.now += 10
    d = driver(ctx, clock)
    await d.power_off()
    clock.now += 1.5
    views.seen(MonitorView(host="h1", term=3, at=0.0))  # heard again after the pill
    clock.now += 1.5
    assert await d.status() == "on"  # 1.5 s out of view, msgwait 2 s
    clock.now += 0.6
    assert await d.status() == "off"


async def test_the_fencers_own_blindness_counts_as_listed(world) -> None:  # type: ignore[no-untyped-def]
    """Views sent while the fencer was reconnecting were lost: it waits msgwait
    after the reconnection (and after its own start)."""
    slots, clock, _, ctx = world
    reconnects = [0]
    views = ViewTracker(clock=clock, reconnects=lambda: reconnects[0])
    ctx = WatchdogContext(ctx.storage, views)
    renew(slots, 7)
    d = driver(ctx, clock)
    await d.power_off()  # the fencer just started: blind until now
    clock.now += 1.5
    reconnects[0] = 1
    clock.now += 1.0
    assert await d.status() == "on"  # 2.5 s after the pill, but only 0 s after the reconnect was seen
    clock.now += 2.1
    assert await d.status() == "off"


async def test_one_renewal_already_under_way_restarts_the_clock(world) -> None:  # type: ignore[no-untyped-def]
    slots, clock, _, ctx = world
    renew(slots, 7)
    clock.now += 10
    d = driver(ctx, clock)
    await d.power_off()
    clock.now += 0.2
    renew(slots, 8)  # it checked just before the pill landed
    assert await d.status() == "on"
    clock.now += 1.9
    assert await d.status() == "on"
    clock.now += 0.2
    assert await d.status() == "off"


async def test_a_host_that_keeps_renewing_after_the_pill_is_never_confirmed(world) -> None:  # type: ignore[no-untyped-def]
    """Two renewals after the pill: alive and ignoring it. Even once it falls silent
    for far longer than msgwait, and after the driver is dropped and made again
    (a failed health check), the level does not confirm until the pill is cleared."""
    slots, clock, _, ctx = world
    renew(slots, 7)
    clock.now += 10
    d = driver(ctx, clock)
    await d.power_off()
    for n in (8, 9):
        clock.now += 0.25
        renew(slots, n)
        try:
            await d.status()
        except DeviceError:
            pass
    clock.now += 60
    with pytest.raises(DeviceError, match="renewed its slot 2 times after the pill: it is alive and ignoring it"):
        await d.status()
    again = driver(ctx, clock)
    await again.power_off()  # a retry or a new request: the same pill, the same verdict
    clock.now += 60
    with pytest.raises(DeviceError, match="ignoring it"):
        await again.status()


async def test_a_new_boot_writing_under_the_pill_is_ignoring_it(world) -> None:  # type: ignore[no-untyped-def]
    slots, clock, _, ctx = world
    renew(slots, 7)
    clock.now += 10
    d = driver(ctx, clock)
    await d.power_off()
    clock.now += 0.5
    renew(slots, 1, boot="b2")
    clock.now += 60
    with pytest.raises(DeviceError, match="ignoring it"):
        await d.status()


async def test_a_host_without_an_armed_watchdog_is_not_protected_and_gets_no_pill(world) -> None:  # type: ignore[no-untyped-def]
    slots, clock, _, ctx = world
    renew(slots, 3, armed=False)
    d = driver(ctx, clock)
    with pytest.raises(DeviceError, match="has not reported an armed watchdog in its slot: not protected"):
        await d.status()
    with pytest.raises(DeviceError, match="not protected"):
        await d.power_off()
    assert slots.pill("h1") is None
    evidence = DeviceEvidence(device="sbd", driver="watchdog", level=2, action_sent="status", power_read="unknown",
                              confirmed=False, error="host h1 has not reported an armed watchdog in its slot: "
                              "not protected by this level")
    ipmi = DeviceEvidence(device="bmc", driver="ipmi", level=1, action_sent="status", power_read="unknown",
                          confirmed=False, error="unreachable: no answer")
    verdict = protection("h1", [ipmi, evidence], 2)
    assert not verdict.protected and "level 2: sbd: host h1 has not reported an armed watchdog" in verdict.reason


async def test_storage_the_fencer_cannot_read_is_unreachable_never_off(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    slots, clock, _, ctx = world
    renew(slots, 7)
    clock.now += 10
    d = driver(ctx, clock)
    await d.power_off()
    os.rename(slots.dir, tmp_path / "away")
    clock.now += 60
    with pytest.raises(DeviceUnreachable):
        await d.status()


async def test_the_watchdog_driver_refuses_to_run_without_the_fencers_view(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="only inside the fencer service"):
        WatchdogDriver("sbd", WatchdogDevice(), "h1", None)


# --- the Linux device port -----------------------------------------------------------

def test_a_device_whose_timeout_cannot_be_learned_is_magic_closed_and_not_armed(tmp_path: Path) -> None:
    """A regular file answers no watchdog ioctl: the agent cannot know the timeout the
    fencer's msgwait must cover, so it stops the device again ('V') and reports no watchdog."""
    path = tmp_path / "watchdog"
    path.write_bytes(b"")
    dog = LinuxWatchdog(str(path))
    with pytest.raises(OSError):
        dog.arm(10)
    assert path.read_bytes() == b"V"
    assert dog.fd is None


def test_keepalive_writes_and_magic_close(tmp_path: Path) -> None:
    path = tmp_path / "watchdog"
    path.write_bytes(b"")
    dog = LinuxWatchdog(str(path))
    dog.fd = os.open(path, os.O_WRONLY)  # as if armed
    dog.feed()
    dog.feed()
    dog.disarm()
    assert path.read_bytes() == b"\0\0V"


# --- configuration -------------------------------------------------------------------

BASE = """
[storage]
slot_dir = "/srv/slots"
watchdog_timeout_s = 10
{storage}
[devices.sbd]
driver = "watchdog"
{device}
[[hosts]]
name = "h1"
memory_mb = 1024
levels = [{{ devices = [{{ device = "sbd"{port} }}] }}]
{host}
"""


def config_text(storage: str = "", device: str = "", host: str = 'watchdog = "/dev/watchdog"', port: str = "") -> str:
    return BASE.format(storage=storage, device=device, host=host, port=port)


def test_a_valid_watchdog_config() -> None:
    config = parse_config(config_text())
    assert isinstance(config.devices["sbd"], WatchdogDevice) and config.hosts[0].watchdog == "/dev/watchdog"


@pytest.mark.parametrize(("text", "key"), [
    (config_text(host=""), "hosts[0].watchdog"),
    (config_text(device="power_timeout_s = 20"), "devices.sbd.power_timeout_s"),
    (config_text(storage="slot_interval_s = 6"), "storage.slot_interval_s"),
    (config_text(storage="view_max_age_s = 6"), "storage.view_max_age_s"),
    (config_text(port=', port = "h2"'), "hosts[0].levels[0].devices[0].port"),
    (config_text().replace('slot_dir = "/srv/slots"', ""), "hosts[0].levels[0].devices[0]"),
])
def test_watchdog_config_mistakes_are_named(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert key in {issue.key for issue in err.value.issues}, err.value


# --- the isolation response ------------------------------------------------------------

def test_an_isolated_host_with_the_pill_policy_is_fenced_through_its_watchdog_levels_only() -> None:
    from hafence.arbiter.policy import Policy, RequestFence
    from hafence.config import HostConfig
    from hafence.fencer.drivers.watchdog import levels_for

    policy = Policy(["h1", "h2", "h3", "h4", "h5"], detection_window_s=1.0, started_at=0.0, isolated_action="pill")
    policy.suspect("h1", "i1", 5.0, late=[])
    [decision] = policy.decide(6.0, storage_live={"h1": True})
    assert isinstance(decision, RequestFence) and decision.method == "watchdog"
    assert "poison pill" in decision.reason
    policy.suspect("h2", "i2", 5.0, late=[])
    [other] = [d for d in policy.decide(6.0, storage_live={}) if d.host == "h2"]
    assert isinstance(other, RequestFence) and other.method == "topology"  # not isolated: every level

    config = parse_config(config_text())
    host = config.hosts[0]
    two = HostConfig(name="h1", memory_mb=1, levels=[*host.levels, *host.levels], watchdog="/dev/watchdog")
    assert levels_for(config, two, "topology") is two
    assert len(levels_for(config, two, "watchdog").levels) == 2
