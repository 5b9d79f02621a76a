"""The fencer against a real NATS server: S2, S3, S4 and dead letters."""

from pathlib import Path

from nats.aio.client import Client as NatsClient

from hafence.contracts import Decoders, FenceResult
from hafence.fencer.service import run as fencer
from hafence.lab.power import SimPowerSwitch
from tests.conftest import eventually, running
from tests.helpers import dead_letters, fence_request, publish_request, read_stream


async def results(nc: NatsClient) -> list[FenceResult]:
    return await read_stream(nc, "HAFENCE_EVENTS", "hafence.fence.result.*", Decoders.fence_result)


async def test_fence_confirms_off_only_after_reading_off(nc: NatsClient, make_config, tmp_path: Path) -> None:
    config = make_config()
    power = SimPowerSwitch(tmp_path / "power")
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("h1", "r1"))
        await eventually(lambda: _count(nc, 1))
    [result] = await results(nc)
    assert result.outcome == "confirmed_off" and result.level == 1
    [e] = result.evidence
    assert (e.device, e.action_sent, e.power_read, e.confirmed) == ("power", "off", "off", True)
    assert e.status_reads >= 1
    assert power.read("h1") == "off"


async def test_s2_a_device_stuck_on_is_never_confirmed(nc: NatsClient, make_config, tmp_path: Path) -> None:
    extra = '[[hosts]]\nname = "stuckhost"\nmemory_mb = 1\nlevels = [{ devices = [{ device = "stuck" }] }]\n'
    config = make_config(extra=extra)
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("stuckhost", "r-stuck"))
        await eventually(lambda: _count(nc, 1))
    [result] = await results(nc)
    assert result.outcome == "failed"
    assert result.evidence[0].power_read == "on" and not result.evidence[0].confirmed
    assert "power still on" in result.reason


async def test_s2_second_level_succeeds_after_the_first_fails(nc: NatsClient, make_config) -> None:
    extra = (
        '[[hosts]]\nname = "twolevel"\nmemory_mb = 1\n'
        'levels = [{ devices = [{ device = "stuck" }] }, { devices = [{ device = "power" }] }]\n'
    )
    config = make_config(extra=extra)
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("twolevel", "r-two"))
        await eventually(lambda: _count(nc, 1))
    [result] = await results(nc)
    assert (result.outcome, result.level) == ("confirmed_off", 2)
    assert [(e.level, e.confirmed) for e in result.evidence] == [(1, False), (2, True)]


async def test_s4_a_redelivered_request_gets_the_recorded_result(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    config = make_config()
    power = SimPowerSwitch(tmp_path / "power")
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("h1", "r1"), msg_id="first")
        await eventually(lambda: _count(nc, 1))
        # Somebody powers the host on again; a second fence would switch it off.
        power.switch("h1", "on")
        await publish_request(nc, fence_request("h1", "r1"), msg_id="second")
        await eventually(lambda: _requests_done(nc))
    # The answer is the recorded one (re-published under the same id, so JetStream
    # keeps a single copy) and the device was not switched a second time.
    [result] = await results(nc)
    assert result.request_id == "r1" and result.outcome == "confirmed_off"
    assert power.read("h1") == "on"


async def test_s4_survives_a_fencer_restart(nc: NatsClient, make_config, tmp_path: Path) -> None:
    config = make_config()
    power = SimPowerSwitch(tmp_path / "power")
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("h1", "r1"), msg_id="first")
        await eventually(lambda: _count(nc, 1))
    power.switch("h1", "on")
    async with running("fencer", config, fencer):
        await publish_request(nc, fence_request("h1", "r1"), msg_id="second")
        await eventually(lambda: _requests_done(nc))
    assert power.read("h1") == "on"


async def test_s3_a_request_from_an_older_term_is_refused(nc: NatsClient, make_config, tmp_path: Path) -> None:
    config = make_config()
    power = SimPowerSwitch(tmp_path / "power")
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("h1", "new-leader", term=9))
        await eventually(lambda: _count(nc, 1))
        power.switch("h1", "on")
    # The highest term is durable: a restarted fencer still refuses the stale leader.
    async with running("fencer", config, fencer):
        await publish_request(nc, fence_request("h2", "old-leader", term=4))
        await eventually(lambda: _count(nc, 2))
    _, refused = await results(nc)
    assert refused.outcome == "refused"
    assert "stale leader term 4" in refused.reason and "term 9" in refused.reason
    assert power.read("h2") == "on"


async def test_malformed_requests_are_dead_lettered_and_the_fencer_carries_on(
    nc: NatsClient, make_config
) -> None:
    config = make_config()
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        js = nc.jetstream()
        await js.publish("hafence.fence.request.h1", b"{not json")
        await js.publish("hafence.fence.request.h1", b'{"type":"fence_request","host":"h1"}')
        await publish_request(nc, fence_request("h2", "r-after"))
        await eventually(lambda: _count(nc, 1))
        await eventually(lambda: _dlq_count(nc, 2))
    letters = await dead_letters(nc)
    assert [d.service for d in letters] == ["fencer", "fencer"]
    assert letters[0].raw == b"{not json" and "undecodable" in letters[0].error
    assert "missing required field" in letters[1].error
    [result] = await results(nc)
    assert result.host == "h2" and result.outcome == "confirmed_off"


async def _stream_exists(nc: NatsClient) -> bool:
    try:
        await nc.jetstream().stream_info("HAFENCE_FENCE_REQUESTS")
        await nc.jetstream().consumer_info("HAFENCE_FENCE_REQUESTS", "fencer")
        return True
    except Exception:
        return False


async def _count(nc: NatsClient, n: int) -> bool:
    try:
        return len(await results(nc)) >= n
    except Exception:
        return False


async def _requests_done(nc: NatsClient) -> bool:
    info = await nc.jetstream().stream_info("HAFENCE_FENCE_REQUESTS")
    return info.state.messages == 0 and info.state.last_seq >= 2


async def _dlq_count(nc: NatsClient, n: int) -> bool:
    try:
        info = await nc.jetstream().stream_info("HAFENCE_DLQ")
    except Exception:
        return False
    return info.state.messages >= n


async def test_a_fencer_killed_mid_request_fences_again_after_redelivery(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    """The first fencer dies (no ack) while the device is still switching; the
    request comes back and the next fencer reads the power state again instead
    of assuming anything, then reports what it read."""
    slow = '[devices.slow]\ndriver = "sim"\nstate_dir = "{d}"\noff_delay_s = 30.0\npower_timeout_s = 60.0\n'.format(
        d=tmp_path / "power"
    )
    host = '[[hosts]]\nname = "slowhost"\nmemory_mb = 1\nlevels = [{ devices = [{ device = "slow" }] }]\n'
    config = make_config(extra=slow + host)
    power = SimPowerSwitch(tmp_path / "power")
    async with running("fencer", config, fencer):
        await eventually(lambda: _stream_exists(nc))
        await publish_request(nc, fence_request("slowhost", "r-crash"))
        await eventually(lambda: power.read("slowhost", now=1e12) == "off")  # the command went out
    assert await results(nc) == []  # it died before it could report
    power.switch("slowhost", "off")  # meanwhile the device finished switching
    async with running("fencer", config, fencer):
        await eventually(lambda: _count(nc, 1), timeout=20)
    [result] = await results(nc)
    assert result.outcome == "confirmed_off" and result.evidence[0].status_reads >= 1
    from hafence.fencer.journal import FenceJournal

    journal = await FenceJournal.open(str(tmp_path / "state" / "fencer.db"))
    async with journal.db.execute("SELECT attempts FROM requests WHERE request_id = 'r-crash'") as cur:
        assert (await cur.fetchone())[0] == 2
    await journal.close()
