"""``hafence deploy …``: the NATS server config and the stack's secrets."""

from __future__ import annotations

import argparse

from hafence.cli.common import EXIT_OK, EXIT_USAGE, _load


def cmd_nats_conf(args: argparse.Namespace) -> int:
    from hafence import natsconf

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    text = natsconf.render(config)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        users = natsconf.permissions(config)
        print(f"wrote {args.out}: {len(users)} users; set these in the NATS server's environment:")
        for user in users:
            print(f"  {natsconf.password_env(user)}")
    else:
        print(text, end="")
    return EXIT_OK


def cmd_secrets(args: argparse.Namespace) -> int:
    """Random passwords for every NATS user and the lab's devices: the files the
    services read, and the env file the NATS server reads. Existing ones are kept."""
    import os
    import secrets
    from pathlib import Path

    from hafence import natsconf

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    env_lines = []
    names = [*natsconf.permissions(config)]
    for name in [*(f"nats_{u.replace('-', '_')}" for u in names), "bmc_password", "pdu_community"]:
        path = directory / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(18) + "\n")
            os.chmod(path, 0o600)
    for user in names:
        value = (directory / f"nats_{user.replace('-', '_')}").read_text().strip()
        env_lines.append(f"{natsconf.password_env(user)}={value}")
    Path(args.env).write_text("\n".join(env_lines) + "\n")
    os.chmod(args.env, 0o600)
    print(f"secrets in {directory}/, NATS server environment in {args.env}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = sub.add_parser("deploy", help="deployment helpers")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    nats_conf = deploy_sub.add_parser("nats-conf", help="NATS server config with a user and permissions per service")
    nats_conf.add_argument("--config", required=True)
    nats_conf.add_argument("--out", default="", help="write here instead of stdout")
    nats_conf.set_defaults(func=cmd_nats_conf)
    secrets_cmd = deploy_sub.add_parser("secrets", help="generate the compose stack's passwords (kept if present)")
    secrets_cmd.add_argument("--config", required=True)
    secrets_cmd.add_argument("--dir", default="deploy/secrets")
    secrets_cmd.add_argument("--env", default="deploy/secrets.env")
    secrets_cmd.set_defaults(func=cmd_secrets)
