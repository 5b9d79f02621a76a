"""``hafence deploy …``: the NATS server config, the stack's secrets, and the
provisioner that creates the streams, the fencer's consumer and the lease bucket."""

from __future__ import annotations

import argparse

from hafence.cli.common import EXIT_NOT_CONFIRMED, EXIT_OK, EXIT_USAGE, _load


def cmd_nats_conf(args: argparse.Namespace) -> int:
    import sys

    from hafence import natsconf

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    try:
        text = natsconf.render(config, sync=args.sync)
    except ValueError as err:
        print(f"hafence deploy nats-conf: {err}", file=sys.stderr)
        return EXIT_USAGE
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
    import sys
    from pathlib import Path

    from hafence import natsconf

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    env_lines = []
    names = [*natsconf.permissions(config)]
    nats_files = [f"nats_{u.replace('-', '_')}" for u in names]
    for name in [*nats_files, "bmc_password", "pdu_community"]:
        path = directory / name
        if name in nats_files and path.exists() and not natsconf.is_safe_password(path.read_text().strip()):
            # nats-server reads the env file's value as config text: one starting
            # with a digit or '-' is a number or a date, and the server won't start.
            print(f"replacing {path}: nats-server cannot read it as a password", file=sys.stderr)
            path.unlink()
        if not path.exists():
            path.write_text((natsconf.new_password() if name in nats_files else secrets.token_urlsafe(18)) + "\n")
            os.chmod(path, 0o600)
    for user in names:
        value = (directory / f"nats_{user.replace('-', '_')}").read_text().strip()
        env_lines.append(f"{natsconf.password_env(user)}={value}")
    Path(args.env).write_text("\n".join(env_lines) + "\n")
    os.chmod(args.env, 0o600)
    print(f"secrets in {directory}/, NATS server environment in {args.env}")
    return EXIT_OK


def cmd_provision(args: argparse.Namespace) -> int:
    """Create or update the streams, the fencer's durable consumer and the lease
    bucket, as the provisioner identity (the only one with those rights)."""
    import asyncio
    import os
    import sys
    import time

    import nats.errors
    import nats.js.errors

    from hafence.bus import Bus

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    if args.user:
        os.environ["HAFENCE_NATS_USER"] = args.user
    if args.password_file:
        os.environ["HAFENCE_NATS_PASSWORD_FILE"] = args.password_file

    async def provision() -> list[str]:
        deadline = time.monotonic() + args.wait
        while True:
            try:
                bus = await Bus.connect(config, "provisioner")
            except ConnectionError as err:
                if time.monotonic() >= deadline:
                    raise
                print(f"{err}; retrying", file=sys.stderr)
                await asyncio.sleep(1.0)
                continue
            try:
                return await bus.provision(args.replicas or None)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as err:
                # A NATS cluster answers JetStream's API only once a majority of its nodes
                # elected a meta leader; compose starts the provisioner before that.
                why = (f"JetStream did not answer ({type(err).__name__}: {err}): is JetStream enabled and, "
                       "in a NATS cluster, a majority of the nodes up with a meta leader?")
                if time.monotonic() >= deadline:
                    raise ConnectionError(why) from None
                print(f"{why}; retrying", file=sys.stderr)
                await asyncio.sleep(1.0)
            finally:
                await bus.close()

    try:
        done = asyncio.run(provision())
    except ConnectionError as err:
        print(f"hafence deploy provision: {err}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    except Exception as err:
        print(f"hafence deploy provision: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    for line in done:
        print(line)
    return EXIT_OK


def natsconf_default_sync() -> str:
    from hafence import natsconf

    return natsconf.DEFAULT_SYNC


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    deploy = sub.add_parser("deploy", help="deployment helpers")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    nats_conf = deploy_sub.add_parser("nats-conf", help="NATS server config with a user and permissions per service")
    nats_conf.add_argument("--config", required=True)
    nats_conf.add_argument("--out", default="", help="write here instead of stdout")
    nats_conf.add_argument("--sync", default=natsconf_default_sync(),
                           help="JetStream sync_interval: 'always' (fsync before each ack, the default) or a "
                                "duration such as 1s (faster; acked messages may be lost on power loss)")
    nats_conf.set_defaults(func=cmd_nats_conf)
    secrets_cmd = deploy_sub.add_parser("secrets", help="generate the compose stack's passwords (kept if present)")
    secrets_cmd.add_argument("--config", required=True)
    secrets_cmd.add_argument("--dir", default="deploy/secrets")
    secrets_cmd.add_argument("--env", default="deploy/secrets.env")
    secrets_cmd.set_defaults(func=cmd_secrets)
    provision = deploy_sub.add_parser(
        "provision", help="create or update the streams, the fencer's consumer and the lease bucket")
    provision.add_argument("--config", required=True)
    provision.add_argument("--replicas", type=int, default=0, choices=[0, 1, 3, 5],
                           help="stream replicas (default: [nats] stream_replicas)")
    provision.add_argument("--user", default="", help="NATS user (default: HAFENCE_NATS_USER, else [nats] user)")
    provision.add_argument("--password-file", default="", help="its password (default: HAFENCE_NATS_PASSWORD_FILE)")
    provision.add_argument("--wait", type=float, default=0.0,
                           help="keep trying this many seconds to connect and to reach JetStream "
                                "(a cluster's meta leader)")
    provision.set_defaults(func=cmd_provision)
