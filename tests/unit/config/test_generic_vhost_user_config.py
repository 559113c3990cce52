"""``GenericVhostUserConfig``: Cloud Hypervisor's ``--generic-vhost-user`` syntax and its
``vm.create`` / ``vm.add-generic-vhost-user`` JSON (``device_type``, as the OpenAPI document)."""

from __future__ import annotations

import pytest

from vmmkit.config import ConfigError, GenericVhostUserConfig, VmConfig
from vmmkit.config.support import DEVICE_SECTIONS, NOT_SUPPORTED


def test_the_cli_spec_with_virtio_id_or_device_type() -> None:
    config = GenericVhostUserConfig.parse("socket=/run/snd.sock,virtio_id=25,queue_sizes=[64,64,64,64],id=snd")
    assert (config.socket, config.device_type, config.queue_sizes, config.id) == ("/run/snd.sock", 25,
                                                                                 (64, 64, 64, 64), "snd")
    assert GenericVhostUserConfig.parse("socket=/s,device_type=26,queue_sizes=[1024,1024]").device_type == 26
    assert GenericVhostUserConfig.parse("socket=/s,virtio_id=4,queue_sizes=256").queue_sizes == (256,)


@pytest.mark.parametrize("spec, message", [
    ("socket=/s,virtio_id=99,queue_sizes=[128]", "99 is not a virtio device ID"),
    ("socket=/s,virtio_id=14,queue_sizes=[128]", "14 is not a virtio device ID"),
    ("socket=/s,virtio_id=block,queue_sizes=[128]", "virtio_id"),
    ("socket=/s,virtio_id=2,queue_sizes=[]", "at least one queue"),
    ("socket=/s,virtio_id=2,queue_sizes=[128,x]", "queue_sizes"),
    ("socket=/s,virtio_id=2,queue_sizes=[96]", "a power of two"),
    ("socket=/s,virtio_id=2,device_type=2,queue_sizes=[128]", "both given"),
    ("virtio_id=2,queue_sizes=[128]", "missing socket"),
    ("socket=/s,queue_sizes=[128]", "missing virtio_id"),
    ("socket=/s,virtio_id=2,queue_sizes=[128],iommu=on", "iommu"),
    ("socket=/s,virtio_id=2,queue_sizes=[128],num_queues=2", "num_queues"),
])
def test_bad_specs_are_refused_by_name(spec: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        GenericVhostUserConfig.parse(spec)
    assert message in str(refused.value) and "--generic-vhost-user" in str(refused.value)


def test_the_json_body_is_cloud_hypervisors() -> None:
    body = {"socket": "/s", "device_type": 2, "queue_sizes": [128], "id": "g0", "pci_segment": 0}
    config = GenericVhostUserConfig.from_json(body, section="generic_vhost_user")
    assert config.queue_sizes == (128,) and config.to_json()["queue_sizes"] == [128]
    for bad, path in (({**body, "device_type": 0}, "device_type"), ({**body, "queue_sizes": []}, "queue_sizes"),
                      ({**body, "virtio_id": 2}, "virtio_id"), ({**body, "queue_sizes": [128, 3]}, "queue_sizes[1]")):
        with pytest.raises(ConfigError) as refused:
            GenericVhostUserConfig.from_json(bad, section="generic_vhost_user")
        assert path in str(refused.value)


def test_in_a_vm_it_needs_shared_memory_gets_an_id_and_is_removable() -> None:
    # Refused by name unless a registered device type claims it (vmmkit-devices' does).
    assert "generic_vhost_user" in NOT_SUPPORTED and "generic_vhost_user" in DEVICE_SECTIONS
    from vmmkit_devices.device_types import GenericVhostUserType

    assert GenericVhostUserType.sections == ("generic_vhost_user",)
    spec = "socket=/s,virtio_id=2,queue_sizes=[128]"
    with pytest.raises(ConfigError) as refused:
        VmConfig.from_cli(memory="size=128M", generic_vhost_user=[spec])
    assert "--memory shared=on" in str(refused.value) and "--generic-vhost-user" in str(refused.value)
    vm = VmConfig.from_cli(memory="size=128M,shared=on", generic_vhost_user=[spec]).assign_ids()
    assert vm.generic_vhost_user[0].id == "_generic_vhost_user0"
    assert VmConfig.from_json(vm.to_json()) == vm
    assert vm.without_device("_generic_vhost_user0").generic_vhost_user == ()
    added = vm.with_generic_vhost_user(GenericVhostUserConfig.parse(spec + ",id=g1")).assign_ids()
    assert [d.id for d in added.generic_vhost_user] == ["_generic_vhost_user0", "g1"]
    with pytest.raises(ConfigError, match="duplicate id"):
        added.with_generic_vhost_user(GenericVhostUserConfig.parse(spec + ",id=g1"))


def test_on_a_segment_behind_the_iommu_it_is_refused() -> None:
    with pytest.raises(ConfigError, match="not behind the IOMMU"):
        VmConfig.from_cli(memory="size=128M,shared=on",
                          platform="num_pci_segments=2,iommu_segments=[1]",
                          generic_vhost_user=["socket=/s,virtio_id=2,queue_sizes=[128],pci_segment=1"])
