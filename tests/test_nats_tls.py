"""TLS to NATS: the bus connects to a TLS-only nats-server when given its CA,
and refuses one it cannot verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from hafence.bus import Bus
from hafence.config import parse_config
from hafence.contracts import HostEvent
from hafence.lab.natsserver import NatsServer
from hafence.lab.tlscert import make_self_signed


async def test_the_bus_speaks_tls_to_nats_and_verifies_the_server(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path / "certs", "hafence-nats")
    conf = tmp_path / "nats.conf"
    server = NatsServer(tmp_path / "nats", config_file=str(conf))
    conf.write_text(f'port: {server.port}\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
                    f'tls {{ cert_file: "{cert}", key_file: "{key}", timeout: 2 }}\n')
    server.start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        config = parse_config(f'[nats]\nurl = "{url}"\ntls_ca_file = "{cert}"\n')
        bus = await Bus.connect(config, "arbiter")
        try:
            await bus.provision()
            await bus.publish(bus.subjects.host_event("h1", "alive"), HostEvent(host="h1", kind="alive", at=0.0))
            info = await bus.js.stream_info(bus.streams.events)
            assert info.state.messages == 1
        finally:
            await bus.close()
        other_ca, _ = make_self_signed(tmp_path / "other", "someone-else")
        untrusted = parse_config(f'[nats]\nurl = "{url}"\ntls_ca_file = "{other_ca}"\n')
        with pytest.raises(ConnectionError, match="cannot connect to NATS"):
            await Bus.connect(untrusted, "arbiter", connect_timeout=2)
    finally:
        server.stop()
