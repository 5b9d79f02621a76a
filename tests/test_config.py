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


BMCS = """
[devices.bmc-a]
driver = "ipmi"
address = "10.0.0.1"
username = "admin"

[devices.bmc-a-again]
driver = "ipmi"
address = "10.0.0.1"
username = "fence"

[devices.rf-b]
driver = "redfish"
address = "10.0.0.2"
username = "admin"

[devices.pdu]
driver = "apc_snmp"
address = "10.0.0.9"

[devices.pdu-alias]
driver = "apc_snmp"
address = "10.0.0.9"
"""


def hosts(*levels: str) -> str:
    return "".join(
        f'\n[[hosts]]\nname = "h{i}"\nmemory_mb = 1\nlevels = [{lv}]\n' for i, lv in enumerate(levels, start=1)
    )


def issues_of(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "c.toml")
    return {issue.key: issue.message for issue in err.value.issues}


def test_a_bmc_given_to_two_hosts_is_refused_naming_both_keys() -> None:
    """Before: accepted, and fencing h2 powered off h1 (the copy-paste slip of issue 10.9)."""
    found = issues_of(BMCS + hosts('{ devices = [{ device = "bmc-a" }] }', '{ devices = [{ device = "bmc-a" }] }'))
    message = found["hosts[1].levels[0].devices[0]"]
    assert "'bmc-a' (ipmi) powers one machine" in message
    assert "host 'h1' (hosts[0].levels[0].devices[0])" in message and "fencing host 'h2'" in message


def test_one_bmc_behind_two_device_names_is_still_one_target() -> None:
    found = issues_of(BMCS + hosts('{ devices = [{ device = "bmc-a" }] }',
                                   '{ devices = [{ device = "bmc-a-again" }] }'))
    assert "hosts[1].levels[0].devices[0]" in found


def test_a_port_on_a_device_without_ports_is_refused() -> None:
    """Before: ipmi and redfish ignored the port, so 'port = "2"' looked like it chose a machine."""
    found = issues_of(BMCS + hosts('{ devices = [{ device = "rf-b", port = "2" }] }'))
    assert "has no ports" in found["hosts[0].levels[0].devices[0].port"]
    assert "'rf-b' (redfish)" in found["hosts[0].levels[0].devices[0].port"]


def test_an_outlet_is_one_target_however_it_is_spelled_and_a_pdu_needs_one() -> None:
    found = issues_of(BMCS + hosts('{ devices = [{ device = "pdu", port = "3" }] }',
                                   '{ devices = [{ device = "pdu-alias", port = "1:3" }] }',
                                   '{ devices = [{ device = "pdu" }] }'))
    assert "port '1:3' of device 'pdu-alias' (apc_snmp)" in found["hosts[1].levels[0].devices[0]"]
    assert "needs the host's outlet" in found["hosts[2].levels[0].devices[0].port"]


def test_one_host_may_use_its_bmc_twice_and_hosts_may_share_a_pdu() -> None:
    config = parse_config(BMCS + hosts(
        '{ devices = [{ device = "bmc-a" }] }, { devices = [{ device = "bmc-a" }] }',
        '{ devices = [{ device = "rf-b" }] }, { devices = [{ device = "pdu", port = "1" }, '
        '{ device = "pdu-alias", port = "2" }] }',
        '{ devices = [{ device = "pdu", port = "2:1" }] }',
    ))
    assert [h.name for h in config.hosts] == ["h1", "h2", "h3"]


def test_config_check_refuses_a_shared_bmc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hafence.cli import main

    path = tmp_path / "cluster.toml"
    path.write_text(BMCS + hosts('{ devices = [{ device = "bmc-a" }] }', '{ devices = [{ device = "bmc-a" }] }'))
    assert main(["config", "check", str(path)]) == 2
    assert "hosts[1].levels[0].devices[0]" in capsys.readouterr().err


def test_config_check_warns_when_a_topology_is_slower_than_the_fence_deadline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hafence.cli import main

    path = tmp_path / "cluster.toml"
    path.write_text("[timings]\nfence_deadline_s = 30.0\n" + BMCS + hosts(
        '{ devices = [{ device = "bmc-a" }] }, { devices = [{ device = "pdu", port = "1" }] }'))
    assert main(["config", "check", str(path)]) == 0
    # Two levels, each 20s with one retry: 80s against a 30s deadline.
    assert "fence_deadline_s = 30s is shorter than the slowest fence of: h1 (80s)" in capsys.readouterr().out


def test_inventory_coalescing_defaults_small_and_zero_turns_it_off() -> None:
    assert parse_config(GOOD).agent.inventory_coalesce_s == 0.05
    assert parse_config(GOOD + "\n[agent]\ninventory_coalesce_s = 0\n").agent.inventory_coalesce_s == 0.0


@pytest.mark.parametrize(("value", "problem"), [("-0.1", "Expected `float` >= 0.0"),
                                                ("2.0", "Expected `float` <= 1.0")])
def test_config_check_refuses_a_coalescing_bound_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, problem: str
) -> None:
    """Negative means nothing; above a second the scheduler's view of a host would lag
    long enough to matter (docs/cores.md, "## agent")."""
    from hafence.cli import main

    path = tmp_path / "cluster.toml"
    path.write_text(GOOD + f"\n[agent]\ninventory_coalesce_s = {value}\n")
    assert main(["config", "check", str(path)]) == 2
    assert f"agent.inventory_coalesce_s: {problem}" in capsys.readouterr().err
