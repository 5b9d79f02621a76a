"""hafence's power drivers against simulated devices that speak the real protocols."""

from __future__ import annotations

import pytest

from hafence.config import ApcSnmpDevice, FenceAgentDevice, IpmiDevice, RedfishDevice
from hafence.fencer.drivers import DeviceAuthError, DeviceError, DeviceUnreachable, make_driver
from hafence.lab.peers import free_udp_port
from tests.peers import Lab, need

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
async def no_leftover_ipmi_workers():  # type: ignore[no-untyped-def]
    """Drivers made by a test die with it (their worker processes belong to its event loop)."""
    from hafence.fencer.drivers import ipmi as ipmi_module

    yield
    for worker in list(ipmi_module._WORKERS.values()):
        await ipmi_module.IpmiDriver._kill(worker)
    ipmi_module._WORKERS.clear()


def ipmi(lab: Lab, host: str = "h1", **kw: object) -> IpmiDevice:
    args: dict[str, object] = dict(address="127.0.0.1", port=lab.bmc_ports[host], username="admin",
                                   password_file=str(lab.password_file), timeout_s=3.0)
    args.update(kw)
    return IpmiDevice(**args)  # type: ignore[arg-type]


def apc(lab: Lab, **kw: object) -> ApcSnmpDevice:
    args: dict[str, object] = dict(address="127.0.0.1", port=lab.pdu_port, community_file=str(lab.community_file),
                                   timeout_s=1.0)
    args.update(kw)
    return ApcSnmpDevice(**args)  # type: ignore[arg-type]


def redfish(lab: Lab, host: str = "h1", **kw: object) -> RedfishDevice:
    args: dict[str, object] = dict(address="127.0.0.1", port=lab.redfish_ports[host], username="admin",
                                   password_file=str(lab.password_file), ca_file=str(lab.cert), timeout_s=3.0)
    args.update(kw)
    return RedfishDevice(**args)  # type: ignore[arg-type]


async def assert_switches_and_reads_back(driver, lab: Lab, target: str) -> None:  # type: ignore[no-untyped-def]
    """off, read back off; on, read back on — each checked against the simulated host too."""
    await driver.power_on()
    await _until(driver, "on")
    assert lab.power.read(target) == "on"
    await driver.power_off()
    await _until(driver, "off")
    assert lab.power.read(target) == "off"
    await driver.power_on()
    await _until(driver, "on")


async def _until(driver, want: str) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    for _ in range(100):
        if await driver.status() == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{driver.name} never read {want}")


async def test_ipmi_driver_switches_and_reads_back(devices: Lab) -> None:
    await assert_switches_and_reads_back(make_driver("bmc", ipmi(devices), "h1"), devices, "h1")


async def test_ipmi_driver_reports_a_wrong_password_as_an_auth_error(devices: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password")
    driver = make_driver("bmc", ipmi(devices, password_file=str(wrong)), "h1")
    with pytest.raises(DeviceAuthError, match="bmc: BMC refused user 'admin'"):
        await driver.status()


async def test_ipmi_driver_reports_a_silent_bmc_as_unreachable(devices: Lab) -> None:
    driver = make_driver("bmc", ipmi(devices, port=free_udp_port(), timeout_s=1.0), "h1")
    with pytest.raises(DeviceUnreachable, match="bmc: no IPMI"):
        await driver.status()


@pytest.mark.parametrize("model", ["auto", "rpdu", "rpdu2", "masterswitch"])
@pytest.mark.parametrize("version", ["1", "2c"])
async def test_apc_driver_switches_an_outlet_with_every_outlet_table(devices: Lab, model: str, version: str) -> None:
    driver = make_driver("pdu", apc(devices, model=model, snmp_version=version), "2")
    await assert_switches_and_reads_back(driver, devices, "h2")


async def test_apc_driver_addresses_a_masterswitch_plus_outlet_by_switch_and_outlet(devices: Lab) -> None:
    driver = make_driver("pdu", apc(devices, model="masterswitch_plus", snmp_version="2c"), "1:2")
    await assert_switches_and_reads_back(driver, devices, "h2")
    with pytest.raises(DeviceError, match="not a number"):
        make_driver("pdu", apc(devices, model="masterswitch_plus"), "one:2")


async def test_apc_driver_speaks_snmp_v3_with_auth_and_privacy(devices: Lab) -> None:
    device = apc(devices, snmp_version="3", community_file="", username="fence", auth_protocol="sha",
                 auth_password_file=str(devices.v3_auth_file), priv_protocol="aes",
                 priv_password_file=str(devices.v3_priv_file))
    await assert_switches_and_reads_back(make_driver("pdu", device, "1"), devices, "h1")


async def test_apc_driver_v3_wrong_key_is_an_auth_error(devices: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong-auth-key-000")
    device = apc(devices, snmp_version="3", community_file="", username="fence", auth_protocol="sha",
                 auth_password_file=str(wrong), priv_protocol="aes", priv_password_file=str(devices.v3_priv_file))
    with pytest.raises(DeviceAuthError):
        await make_driver("pdu", device, "1").status()


async def test_apc_driver_wrong_community_gets_no_answer(devices: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wrong = tmp_path / "wrong"
    wrong.write_text("public")
    with pytest.raises(DeviceUnreachable):
        await make_driver("pdu", apc(devices, community_file=str(wrong)), "1").status()


async def test_apc_driver_names_a_missing_outlet(devices: Lab) -> None:
    with pytest.raises(DeviceError, match="has no"):
        await make_driver("pdu", apc(devices, model="rpdu"), "17").status()


async def test_redfish_driver_switches_and_reads_back_over_verified_tls(devices: Lab) -> None:
    await assert_switches_and_reads_back(make_driver("rf", redfish(devices), "h1"), devices, "h1")


async def test_redfish_driver_refuses_an_untrusted_certificate(devices: Lab) -> None:
    driver = make_driver("rf", redfish(devices, ca_file=""), "h1")
    with pytest.raises(DeviceError, match=r"certificate of 127\.0\.0\.1 not trusted"):
        await driver.status()


async def test_redfish_driver_reports_a_wrong_password(devices: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    wrong = tmp_path / "wrong"
    wrong.write_text("nope")
    with pytest.raises(DeviceAuthError, match="HTTP 401"):
        await make_driver("rf", redfish(devices, password_file=str(wrong)), "h1").status()


async def test_fence_agent_driver_runs_fence_ipmilan_over_stdin(devices: Lab) -> None:
    agent = need("fence_ipmilan")
    device = FenceAgentDevice(
        agent=agent, password_file=str(devices.password_file), port_option="",
        options={"ip": "127.0.0.1", "ipport": str(devices.bmc_ports["h2"]), "username": "admin", "lanplus": "1",
                 "cipher": "3", "power_wait": "0"},
    )
    await assert_switches_and_reads_back(make_driver("agent", device, ""), devices, "h2")


async def test_fence_agent_driver_reports_failures_without_the_password(devices: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    agent = need("fence_ipmilan")
    wrong = tmp_path / "wrong"
    wrong.write_text("Wr0ng-pass-9981")
    device = FenceAgentDevice(
        agent=agent, password_file=str(wrong), port_option="", timeout_s=20,
        options={"ip": "127.0.0.1", "ipport": str(devices.bmc_ports["h2"]), "username": "admin", "lanplus": "1",
                 "cipher": "3"},
    )
    with pytest.raises(DeviceError) as err:
        await make_driver("agent", device, "").status()
    assert "Wr0ng-pass-9981" not in str(err.value)
    assert "fence_ipmilan status exited 1" in str(err.value)


def test_fence_agent_driver_names_a_missing_agent() -> None:
    with pytest.raises(DeviceError, match=r"fence agent .fence_nonexistent. not found"):
        make_driver("agent", FenceAgentDevice(agent="fence_nonexistent"), "")
