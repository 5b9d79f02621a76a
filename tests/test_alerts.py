"""The Prometheus alerting rules: valid (promtool check), unit-tested with input
series for every rule (promtool test rules), loaded by the Prometheus config and
routed by Alertmanager in compose, each with a runbook link and metrics hafence exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from hafence import metrics
from tests.prom import debian_tool

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
RULES = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"][0]["rules"]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool = debian_tool("promtool")
    checked = run(promtool, "check", "rules", str(PROM / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", str(PROM / "alerts.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_rule_has_unit_tests_that_see_it_fire_and_stay_quiet() -> None:
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in RULES}
    assert fired == names and quiet == names, (names - fired, names - quiet)


def test_every_rule_links_its_runbook_and_uses_only_exported_metrics() -> None:
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}
    for rule in RULES:
        assert re.fullmatch(r"README\.md#runbook-[a-z0-9-]+", rule["annotations"]["runbook_url"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        for name in re.findall(r"hafence_[a-z_]+", rule["expr"]):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert base in exported or name in exported, (rule["alert"], name)


def test_prometheus_loads_the_rules_and_alertmanager_the_routes_as_compose_mounts_them() -> None:
    promtool = debian_tool("promtool")
    checked = run(promtool, "check", "config", str(ROOT / "deploy" / "prometheus.yml"))
    assert checked.returncode == 0 and "10 rules found" in checked.stdout, checked.stdout + checked.stderr
    amtool = debian_tool("amtool", "prometheus-alertmanager")
    routes = run(amtool, "check-config", str(PROM / "alertmanager.yml"))
    assert routes.returncode == 0, routes.stdout + routes.stderr

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["prometheus"]["volumes"])
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus.yml"
    for rule_file in config["rule_files"]:  # relative to the config, in the container as here
        in_container = f"/etc/prometheus/{rule_file}"
        source = next(src + in_container.removeprefix(dst) for dst, src in mounts.items()
                      if in_container.startswith(dst))
        assert (ROOT / source).resolve() == (ROOT / "deploy" / rule_file).resolve()
    [target] = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert target.split(":")[0] in compose and "alertmanager" in compose["prometheus"]["depends_on"]
    am_mounts = dict(v.split(":")[:2][::-1] for v in compose["alertmanager"]["volumes"])
    assert am_mounts["/etc/alertmanager/alertmanager.yml"] == "./deploy/prometheus/alertmanager.yml"
