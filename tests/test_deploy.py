"""The compose deployment, checked as far as a machine without a Docker engine
allows: the files parse, and every command, module, config path, secret, NATS
user, scrape target and dashboard metric points at something that exists."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hafence import metrics, natsconf
from hafence.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def hafence_services(compose: dict) -> dict[str, dict]:  # type: ignore[type-arg]
    return {name: svc for name, svc in compose["services"].items() if svc.get("image") == "hafence:latest"}


def test_every_hafence_command_is_a_module_of_the_image(compose: dict) -> None:  # type: ignore[type-arg]
    services = hafence_services(compose)
    assert {"heartbeat", "arbiter", "fencer", "scheduler", "agent-lab-1", "bmcsim", "pdusim"} <= set(services)
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m"]' in dockerfile
    for name, svc in services.items():
        module = svc["command"][0]
        assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
        if "--config" in svc["command"]:
            path = svc["command"][svc["command"].index("--config") + 1]
            mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", []) if v.startswith("./")}
            assert path in mounts, f"{name}: {path} is not mounted"
            load_config(ROOT / mounts[path])  # parses, cross-references hold


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_every_nats_identity_has_a_user_and_its_secret(compose: dict) -> None:  # type: ignore[type-arg]
    config = load_config(ROOT / "deploy" / "cluster.toml")
    users = natsconf.permissions(config)
    for name, svc in hafence_services(compose).items():
        env = svc.get("environment", {})
        if "HAFENCE_NATS_USER" not in env:
            continue
        assert env["HAFENCE_NATS_USER"] in users, name
        secret = env["HAFENCE_NATS_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert secret in svc["secrets"] and secret in compose["secrets"], name
    for name in ("fencer",):
        assert {"bmc_password", "pdu_community"} <= set(compose["services"][name]["secrets"])


def test_every_service_starts_after_the_provisioner(compose: dict) -> None:  # type: ignore[type-arg]
    """Services may not create streams: the one-shot provisioner runs first, as its own identity."""
    provision = compose["services"]["provision"]
    assert provision["command"][:3] == ["hafence.cli", "deploy", "provision"]
    assert provision["environment"]["HAFENCE_NATS_USER"] == "provisioner"
    assert provision["depends_on"] == {"nats": {"condition": "service_healthy"}}
    for name, svc in hafence_services(compose).items():
        if name == "provision" or svc["command"][0] in ("hafence.lab.bmcsim", "hafence.lab.pdusim"):
            continue
        assert svc["depends_on"] == {"provision": {"condition": "service_completed_successfully"}}, name


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}`` substitution, enough for our file."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1]) or m[2], text)


def test_the_nats_cluster_profile_points_everyone_at_three_nodes_with_three_replicas() -> None:
    env = dict(line.split("=", 1) for line in (ROOT / "deploy" / "nats-cluster.env").read_text().splitlines()
               if line and not line.startswith("#"))
    compose = yaml.safe_load(_interpolate((ROOT / "docker-compose.yml").read_text(), env))
    nodes = {name for name, svc in compose["services"].items() if "nats-cluster" in svc.get("profiles", [])}
    assert len(nodes) == 3
    command = compose["services"]["provision"]["command"]
    assert command[command.index("--replicas") + 1] == "3"
    for name, svc in hafence_services(compose).items():
        if svc["command"][0] in ("hafence.lab.bmcsim", "hafence.lab.pdusim"):
            continue
        servers = {u.removeprefix("nats://").split(":")[0] for u in svc["environment"]["HAFENCE_NATS_URL"].split(",")}
        assert servers == nodes, name
    # Without the env file: the single server of cluster.toml, one replica.
    plain = yaml.safe_load(_interpolate((ROOT / "docker-compose.yml").read_text(), {}))
    assert plain["services"]["heartbeat"]["environment"]["HAFENCE_NATS_URL"] == ""
    command = plain["services"]["provision"]["command"]
    assert command[command.index("--replicas") + 1] == "1"


def test_prometheus_scrapes_every_service_on_its_metrics_port(compose: dict) -> None:  # type: ignore[type-arg]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name, svc in hafence_services(compose).items():
        if svc["command"][0] in ("hafence.lab.bmcsim", "hafence.lab.pdusim", "hafence.cli"):
            continue  # simulators, and the one-shot provisioner
        assert f"{name}:{svc['environment']['HAFENCE_METRICS_PORT']}" in targets, name


def test_the_dashboard_uses_only_metrics_hafence_exports() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "hafence.json").read_text())
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name")}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"hafence_[a-z_]+", target["expr"]))
    assert used
    for name in used:
        base = re.sub(r"_(bucket|count|sum|total)$", "", name)
        assert base in exported or name in exported, name


def test_compose_config_is_valid_for_a_compose_implementation(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose (Debian's) not installed")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy", ignore=shutil.ignore_patterns("secrets", "secrets.env"))
    made = subprocess.run([sys.executable, "-m", "hafence.cli", "deploy", "secrets", "--config",
                           str(tmp_path / "deploy" / "cluster.toml"), "--dir", str(tmp_path / "deploy" / "secrets"),
                           "--env", str(tmp_path / "deploy" / "secrets.env")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    cluster_env = ["--env-file", str(tmp_path / "deploy" / "nats-cluster.env")]
    for profile in ([], ["--profile", "lab"], ["--profile", "nats-cluster"],
                    [*cluster_env, "--profile", "nats-cluster"]):
        result = subprocess.run([tool, "-f", str(tmp_path / "docker-compose.yml"), *profile, "config", "-q"],
                                capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 0, (profile, result.stderr)
