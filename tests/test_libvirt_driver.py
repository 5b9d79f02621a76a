"""The agent's libvirt driver against libvirt's built-in test driver."""

from __future__ import annotations

import os

import pytest

from hafence.agent.hypervisor import HypervisorError
from hafence.contracts import VmSpec, VmStart

try:
    import libvirt  # noqa: F401
except ImportError:
    if os.environ.get("HAFENCE_REQUIRE_PEERS") == "1":
        raise
    pytest.skip("libvirt-python not installed (needs libvirt-dev)", allow_module_level=True)

from hafence.agent.libvirt_driver import LibvirtHypervisor, spec_of

XML = """<domain type='test'>
  <name>db-7</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <memory unit='MiB'>2048</memory>
  <vcpu>2</vcpu>
  <metadata>
    <hafence:vm xmlns:hafence="https://hafence.dev/xmlns/vm/1" ha="true" priority="high"
                anti-affinity="db-replicas" labels="ssd"/>
  </metadata>
  <os><type>hvm</type></os>
</domain>"""


def test_hafence_attributes_come_from_the_domain_metadata() -> None:
    spec = spec_of(XML)
    assert (spec.name, spec.memory_mb, spec.vcpus, spec.ha, spec.priority) == ("db-7", 2048, 2, True, "high")
    assert spec.anti_affinity == ["db-replicas"] and spec.labels == ["ssd"]
    assert spec.uuid == "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


async def test_lists_starts_a_vm_from_its_definition_and_stops_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hv = LibvirtHypervisor("test:///default")
    before = {vm.spec.name: vm.state for vm in await hv.list_vms()}
    assert before.get("test") == "running"  # the test driver's own domain
    definition = tmp_path / "db-7.xml"  # the definition lives on shared storage
    definition.write_text(XML)
    await hv.start(VmSpec(name="db-7", memory_mb=2048, definition=str(definition)))
    vms = {vm.spec.name: vm for vm in await hv.list_vms()}
    assert vms["db-7"].state == "running" and vms["db-7"].spec.ha
    await hv.start(VmSpec(name="db-7", memory_mb=2048))  # already running: nothing happens
    await hv.stop("db-7")
    assert {vm.spec.name: vm.state for vm in await hv.list_vms()}["db-7"] == "stopped"
    await hv.start(VmSpec(name="db-7", memory_mb=2048))  # defined now: started again without XML
    await hv.stop_all()
    assert all(vm.state == "stopped" for vm in await hv.list_vms())


async def test_a_vm_without_definition_is_a_clear_error() -> None:
    hv = LibvirtHypervisor("test:///default")
    with pytest.raises(HypervisorError, match="nowhere-9 is not defined here"):
        await hv.start(VmSpec(name="nowhere-9", memory_mb=1))


def test_a_bad_uri_is_a_clear_error() -> None:
    with pytest.raises(HypervisorError, match="cannot connect to libvirt at"):
        LibvirtHypervisor("test:///nonexistent-file.xml")


async def test_autostart_is_turned_off_for_hafence_domains_and_config_vms_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hv = LibvirtHypervisor("test:///default")
    dom = hv.conn.defineXML(XML)  # carries hafence metadata
    dom.setAutostart(1)
    hv.conn.lookupByName("test").setAutostart(1)  # not ours: left alone
    assert await hv.disable_autostart(set()) == ["db-7"]
    assert not dom.autostart() and hv.conn.lookupByName("test").autostart()
    assert await hv.disable_autostart({"test"}) == ["test"]  # known to the config: ours
    definition = tmp_path / "web-1.xml"
    definition.write_text(XML.replace("db-7", "web-1").replace("4dea22b3", "5dea22b3"))
    await hv.start(VmSpec(name="web-1", memory_mb=1, definition=str(definition)))
    assert not hv.conn.lookupByName("web-1").autostart()  # defined by us: never at boot


async def test_the_agent_starts_a_defined_but_shut_off_domain(nc, make_config) -> None:  # type: ignore[no-untyped-def]
    """Agent truth (issue 10, item 8): a domain that ran here once is started again."""
    from hafence.agent.service import run as agent
    from tests.conftest import running
    from tests.test_agent import ask

    hv = LibvirtHypervisor("test:///default")
    hv.conn.defineXML(XML)  # defined, shut off
    async with running("agent", make_config(), agent, host="h1", hypervisor=hv):
        reply = await ask(nc, VmStart(vm=VmSpec(name="db-7", memory_mb=2048)))
        assert reply.ok and not reply.already  # old agent: already=True, the VM stayed off
        assert hv.conn.lookupByName("db-7").isActive()
        assert (await ask(nc, VmStart(vm=VmSpec(name="db-7", memory_mb=2048)))).already
