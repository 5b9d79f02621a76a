"""Terms never go back, end to end: separate processes, a real nats-server, and
the lease bucket deleted and recreated in the middle of a run (data loss, a move
to the 3-node profile, ``nats kv rm``). Fencing must still complete."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import KeyValueConfig

from hafence.contracts import FenceResult
from hafence.lab.cluster import Lab, LabSpec
from tests.conftest import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

BUCKET = "HAFENCE_leases"


async def test_s3_fencing_completes_after_the_lease_bucket_is_recreated() -> None:
    """Before: the arbiter's term was the revision of its lease's create; in the
    recreated bucket revisions start at 1 again, so every request of the new term
    was refused by the fencer (it had admitted a higher term), each re-issue was
    dropped as a duplicate message, and the host stayed 'fencing', silently."""
    spec = LabSpec(heartbeat_interval_s=0.3, lease_ttl_s=2.0)
    lab = Lab(spec)
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.observer.nc is not None
        js = lab.observer.nc.jetstream()

        async def revision() -> int:
            return (await js.stream_info(f"KV_{BUCKET}")).state.last_seq

        # Let the bucket's revisions run well ahead, then elect a new arbiter there,
        # so the term the fencer admits is far above what a fresh bucket hands out.
        await eventually(lambda: _above(revision, 40), timeout=30)
        lab.services["arbiter"].terminate()
        lab.start_service("arbiter", "arbiter-2")
        await eventually(lambda: _holder(lab, "arbiter-2"), timeout=15)
        lab.crash("lab-2")
        done = lambda h: [r for r in lab.fence_results(h) if r.outcome == "confirmed_off"]  # noqa: E731
        assert await lab.observer.wait_for(lambda: bool(done("lab-2")), 30), lab.diagnostics()
        before = done("lab-2")[0]
        assert isinstance(before, FenceResult) and before.term > 40

        await js.delete_key_value(BUCKET)
        await asyncio.sleep(0.5)
        await js.create_key_value(KeyValueConfig(bucket=BUCKET, ttl=spec.lease_ttl_s, history=1))
        await eventually(lambda: _holder(lab, "arbiter-2"), timeout=20)

        lab.crash("lab-3")
        assert await lab.observer.wait_for(lambda: bool(done("lab-3")), 40), lab.diagnostics()
        [after] = done("lab-3")
        assert isinstance(after, FenceResult) and after.term > before.term
        assert [r for r in lab.fence_results("lab-3") if r.outcome == "refused"] == []
        # Losing the bucket cost the leases a few renewals, and no service a restart.
        for name in ("heartbeat", "arbiter-2", "fencer", "scheduler"):
            assert "failed; restarting" not in lab.services[name].log_path.read_text(), name
    finally:
        await lab.stop()


async def _above(revision, n: int) -> bool:  # type: ignore[no-untyped-def]
    try:
        return int(await revision()) > n
    except Exception:
        return False


async def _holder(lab: Lab, instance: str) -> bool:
    return await lab.lease_holder("arbiter") == instance
