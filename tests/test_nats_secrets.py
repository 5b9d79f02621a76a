"""`hafence deploy secrets` writes NATS passwords that nats-server always reads
as passwords. The old generator (token_urlsafe) wrote one starting with '-' or
digits-then-'-' about once per 60 passwords: nats-server lexes an environment
variable's value like config text and read it as a number or a date, and about
one generated compose config in seven did not start."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from hafence import natsconf
from hafence.cli import main
from hafence.config import parse_config
from hafence.lab.natsserver import NatsServer, free_port

HOSTS = 70  # 76 NATS users per generated config
CONFIGS = 5  # 380 generated passwords, each parsed by a real nats-server


def _cluster(n: int) -> str:
    return "".join(f'[[hosts]]\nname = "h{i}"\nmemory_mb = 1024\n' for i in range(1, n + 1))


async def test_every_generated_password_is_read_by_nats_server(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(_cluster(HOSTS))
    config = parse_config(cluster.read_text())
    users = list(natsconf.permissions(config))
    for run in range(CONFIGS):
        d = tmp_path / f"run{run}"
        assert main(["deploy", "secrets", "--config", str(cluster), "--dir", str(d / "secrets"),
                     "--env", str(d / "secrets.env")]) == 0
        # The server gets the passwords the way compose gives them: env_file lines.
        env = dict(line.split("=", 1) for line in (d / "secrets.env").read_text().splitlines() if line)
        conf = d / "nats.conf"
        server = NatsServer(d / "nats", config_file=str(conf), env=env)
        conf.write_text(natsconf.render(config, store_dir=str(d / "js"), port=server.port, http_port=free_port()))
        try:
            server.start()
        except RuntimeError:
            pytest.fail(f"nats-server did not start with generated passwords:\n{server.log_path.read_text()}")
        try:
            for user in users:
                password = (d / "secrets" / f"nats_{user.replace('-', '_')}").read_text().strip()
                nc = await nats.connect(server.url, user=user, password=password, connect_timeout=2,
                                        max_reconnect_attempts=0, allow_reconnect=False)
                await nc.close()
        finally:
            server.stop()


def test_the_password_format_cannot_be_misread() -> None:
    for _ in range(2000):
        password = natsconf.new_password()
        assert natsconf.is_safe_password(password), password
    for bad in ("-abcdefghijklmnopq", "2024-01-01abcdefgh", "12345678901234567", "abc", "abcdefgh-ijklmnopq"):
        assert not natsconf.is_safe_password(bad), bad


def test_secrets_replaces_an_unreadable_nats_password_and_keeps_good_ones(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.toml"
    cluster.write_text(_cluster(1))
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "nats_arbiter").write_text("-Jw3kLq0aaaaaaaaaaaaaa\n")  # what token_urlsafe once wrote
    (secrets / "nats_fencer").write_text("KeepMe0123456789abcdef\n")
    (secrets / "bmc_password").write_text("-not-for-nats\n")  # a device secret: not NATS's to judge
    assert main(["deploy", "secrets", "--config", str(cluster), "--dir", str(secrets),
                 "--env", str(tmp_path / "secrets.env")]) == 0
    assert natsconf.is_safe_password((secrets / "nats_arbiter").read_text().strip())
    assert (secrets / "nats_fencer").read_text() == "KeepMe0123456789abcdef\n"
    assert (secrets / "bmc_password").read_text() == "-not-for-nats\n"
    env = (tmp_path / "secrets.env").read_text()
    assert "HAFENCE_NATS_PW_FENCER=KeepMe0123456789abcdef\n" in env
