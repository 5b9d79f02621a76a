"""The dashboard tells the truth: Debian's real Prometheus scrapes every process of
a lab (services and agents) through one failover, then every expression of the
Grafana dashboard is evaluated through Prometheus's HTTP API and must show what
happened: one confirmed fence, the VMs restarted, a failover duration, and zero
bad messages as 0, not "no data"."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from hafence.lab.cluster import SERVICES, Lab, LabSpec
from hafence.lab.demo import failover_done
from hafence.lab.natsserver import free_port
from hafence.lab.procs import die_with_parent
from tests.prom import debian_tool

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "hafence.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def prometheus_binary() -> str:
    return debian_tool("prometheus")


class Prometheus:
    """A real Prometheus on 127.0.0.1, scraping every second; queried over its HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict]:  # type: ignore[type-arg]
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]  # type: ignore[no-any-return]

    def rules(self) -> list[dict]:  # type: ignore[type-arg]
        with urllib.request.urlopen(f"{self.url}/api/v1/rules", timeout=5) as resp:
            return [r for g in json.loads(resp.read())["data"]["groups"] for r in g["rules"]]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    async def until(self, what: str, check: object, timeout: float = 30.0) -> None:
        """Wait off the event loop (the lab's observer keeps recording meanwhile)."""
        await asyncio.to_thread(self.wait, what, check, timeout)

    def wait(self, what: str, check: object, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except (OSError, AssertionError):
                pass  # not up yet
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: {what} not reached in {timeout}s")
            time.sleep(0.25)


@contextmanager
def prometheus(workdir: Path, jobs: dict[str, list[str]]) -> Iterator[Prometheus]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(ALERTS)] if ALERTS.exists() else [],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}
                           for job, targets in jobs.items()],
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    log.close()
    try:
        prom = Prometheus(f"http://127.0.0.1:{port}")
        prom.wait("ready", lambda: urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1).status == 200)
        yield prom
    except BaseException:
        print((workdir / "prometheus.log").read_text()[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in dashboard["panels"]}


def by(result: list[dict], label: str) -> dict[str, float]:  # type: ignore[type-arg]
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


async def test_every_dashboard_panel_shows_the_failover_prometheus_scraped(tmp_path: Path) -> None:
    prometheus_binary()
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, storage_lease=True), base_dir=str(tmp_path / "lab"))
    try:
        await lab.start()
        assert lab.config is not None
        jobs = {
            "hafence": [f"127.0.0.1:{lab.metrics_ports[s]}" for s in SERVICES],
            "hafence-agents": [f"127.0.0.1:{lab.metrics_ports[f'agent-{h}']}" for h in lab.spec.host_names()],
        }
        targets = sum(len(t) for t in jobs.values())
        with prometheus(tmp_path / "prometheus", jobs) as prom:
            await lab.wait_ready()
            # Every target up and scraped a few times before the incident: the counters'
            # zeros are on record, so increase() sees the step to 1.
            await prom.until("every target up", lambda: prom.value("count(up == 1)") == targets)
            await prom.until("three scrapes of each", lambda: prom.value("min(count_over_time(up[1m]))") >= 3)

            victim = "lab-2"
            expected = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
            lab.crash(victim)
            assert await lab.observer.wait_for(lambda: failover_done(lab, victim, expected), 30), lab.diagnostics()
            # Each process is scraped at its own phase: wait until every one was, after the incident.
            await prom.until("the failover scraped", lambda: (
                prom.value("sum(hafence_failover_duration_seconds_count)") == 1
                and prom.value('sum(hafence_fence_operations_total{outcome="confirmed_off"})') == 1
                and prom.value('sum(hafence_agent_vm_starts_total{result="started"})') == len(expected)
                and prom.value('sum(hafence_vm_starts_total{result="started"})') == len(expected)
                and prom.value('max(hafence_hosts{job="hafence",state="fenced"})') == 1))

            panels = dashboard_exprs()
            results = {title: [prom.query(expr) for expr in exprs] for title, exprs in panels.items()}
            # No panel is empty ("no data"): the whole dashboard has something to draw.
            empty = [title for title, rs in results.items() if any(not r for r in rs)]
            assert not empty, f"panels with no data: {empty}"

            fences = by(results["Fences by outcome"][0], "outcome")
            assert round(fences["confirmed_off"]) == 1 and fences["failed"] == 0 and fences["refused"] == 0, fences
            starts = by(results["VMs restarted / failed starts"][0], "result")
            assert round(starts["started"]) == len(expected) and starts["failed"] == 0, starts
            decisions = by(results["Arbiter decisions (skips by rule)"][0], "rule")
            assert round(decisions["fence"]) == 1 and decisions["storm"] == 0 and decisions["escalated"] == 0
            for title in ("Fence duration p50 / p99",
                          "Failover duration (fence confirmed -> last HA VM started), p99"):
                for result in results[title]:
                    seconds = float(result[0]["value"][1])
                    assert not math.isnan(seconds) and seconds > 0, (title, result)
            bad = by(results["Bad messages (dead letters)"][0], "service")
            assert set(bad) >= set(SERVICES) and all(v == 0 for v in bad.values()), bad
            assert by(results["Hosts by state (arbiter)"][0], "state").get("fenced") == 1
            assert float(results["HA VMs pending"][0][0]["value"][1]) == 0
            assert float(results["Hosts not protected by a working fence level"][0][0]["value"][1]) >= 0
            assert set(by(results["Leader terms"][0], "role")) == {"heartbeat", "arbiter", "scheduler"}
            sent = by(results["Agents: heartbeats sent per second"][0], "host")
            assert all(sent[h] > 0 for h in lab.spec.host_names() if h != victim), sent
            agent_starts = by(results["Agents: VM starts by result"][0], "result")
            assert round(agent_starts["started"]) == len(expected) and agent_starts["failed"] == 0, agent_starts
            # A dead host's agent is no longer scraped: its lease age keeps growing from its last renewal.
            ages = by(results["Agents: storage lease age (s)"][0], "host")
            assert set(ages) == set(lab.spec.host_names()) and ages[victim] > max(
                v for h, v in ages.items() if h != victim), ages
            # The frozen host is still "powered" (its agent hangs); after the fence its switch is off,
            # but the frozen agent cannot say so: it is not scraped (up == 0), not counted.
            assert prom.value(f'up{{instance="127.0.0.1:{lab.metrics_ports["agent-" + victim]}"}}') == 0

            # The alerting rules ran against the lab's real series without an evaluation error.
            rules = prom.rules()
            assert len(rules) == 10 and all(r["health"] == "ok" for r in rules), rules
    finally:
        await lab.stop()
