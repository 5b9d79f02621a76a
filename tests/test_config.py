from pathlib import Path

import pytest

from hafence.config import ConfigError, load_config, parse_config, read_secret

GOOD = """
[timings]
heartbeat_interval_s = 1.0

[devices.pdu-a]
driver = "sim"
state_dir = "/tmp/x"

[[hosts]]
name = "h1"
memory_mb = 1024
levels = [{ devices = [{ device = "pdu-a", port = "3" }] }]

[[vms]]
name = "vm1"
host = "h1"
memory_mb = 512
ha = true
"""


def test_a_good_file_loads() -> None:
    config = parse_config(GOOD)
    assert config.host("h1").levels[0].devices[0].port == "3"
    assert config.timings.detection_window_s == 3.0
    assert [vm.name for vm in config.vms_of("h1")] == ["vm1"]


def test_a_typo_in_a_key_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(GOOD.replace("heartbeat_interval_s", "heartbeat_intervall_s"), "cluster.toml")
    text = str(err.value)
    assert "cluster.toml" in text
    assert "timings" in text and "heartbeat_intervall_s" in text


def test_a_wrong_type_names_the_file_key_and_problem() -> None:
    with pytest.raises(ConfigError, match=r"cluster.toml: timings.heartbeat_interval_s: Expected `float`"):
        parse_config(GOOD.replace("heartbeat_interval_s = 1.0", 'heartbeat_interval_s = "fast"'), "cluster.toml")


def test_an_out_of_range_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"timings.heartbeat_interval_s: Expected `float` >"):
        parse_config(GOOD.replace("heartbeat_interval_s = 1.0", "heartbeat_interval_s = 0.0"))


def test_all_cross_reference_errors_are_reported_at_once() -> None:
    bad = GOOD.replace('device = "pdu-a"', 'device = "pdu-z"').replace('host = "h1"', 'host = "h9"')
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "c.toml")
    keys = [issue.key for issue in err.value.issues]
    assert keys == ["hosts[0].levels[0].devices[0].device", "vms[0].host"]
    assert "unknown power device 'pdu-z'" in str(err.value)


def test_an_invalid_host_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"hosts\[0\].name"):
        parse_config(GOOD.replace('name = "h1"', 'name = "h.1"'))


def test_syntax_errors_and_missing_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("[timings\n", "c.toml")
    with pytest.raises(ConfigError, match=r"missing.toml: \(file\): cannot read"):
        load_config(tmp_path / "missing.toml")


def test_an_unknown_device_driver_is_named() -> None:
    with pytest.raises(ConfigError, match=r"devices.pdu-a"):
        parse_config(GOOD.replace('driver = "sim"', 'driver = "telepathy"'))


def test_secrets_come_from_files_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    assert read_secret(str(secret), "", "x") == "s3cret"
    monkeypatch.setenv("HAFENCE_TEST_PW", "envpw")
    assert read_secret("", "HAFENCE_TEST_PW", "x") == "envpw"
    with pytest.raises(ConfigError, match="HAFENCE_NOPE is not set"):
        read_secret("", "HAFENCE_NOPE", "devices.x.password")


def test_every_structural_error_is_reported_in_one_pass() -> None:
    bad = (
        '[timings]\nheartbeat_interval_s = "x"\n[[hosts]]\nname = "a.b"\nmemory_mb = 1\n'
        '[devices.q]\ndriver = "nope"\n[bogus]\n'
    )
    with pytest.raises(ConfigError) as err:
        parse_config(bad, "c.toml")
    assert [i.key for i in err.value.issues] == [
        "timings.heartbeat_interval_s", "hosts[0].name", "devices.q.driver", "bogus",
    ]
    assert "use one of sim, ipmi, apc_snmp, redfish, agent" in str(err.value)
