"""The device ID an MSI carries: a PCI function's requester ID, set by the root when it is plugged
and passed with every route and message (a GICv3 ITS translates MSIs per device)."""

from __future__ import annotations

from pci_support import AVAIL, DESC, S_DRIVER_OK, USED, Driver, FakeDevice, FakeMachine, FakeVm, virtio_request

from vmmkit.pci.host import requester_id
from vmmkit.pci.msix import MsixTable
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, VirtioInterruptType


def test_requester_id_layout() -> None:
    assert requester_id(0, 0, 1) == 0x08
    assert requester_id(0, 0, 31, 7) == 0xFF
    assert requester_id(1, 2, 3, 4) == 0x1_021C


def test_routes_carry_the_function_requester_id(machine: FakeMachine, vm: FakeVm) -> None:
    device = FakeDevice(sizes=(64,))
    placed = machine.place(device, virtio_request(device.id, pci_device_id=5))  # type: ignore[arg-type]
    assert placed.device.requester_id == 5 << 3
    drv = Driver(machine, 5)
    drv.enable_msix(2)
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    assert drv.setup_queue(0, 8, DESC, AVAIL, USED, vector=0) == 0
    drv.enable_queue(0)
    drv.add_status(S_DRIVER_OK)
    routes = [call for call in vm.calls if call[0] == "set_msi_route"]
    assert routes and all(vm.devids[gsi] == 5 << 3 for _, gsi, _, _ in routes)
    device.contexts[0].interrupt.trigger(VirtioInterruptType.QUEUE, 0)
    assert len(vm.delivered()) == 1


class RecordingVm(FakeVm):
    def __init__(self) -> None:
        super().__init__(irqfd=False)
        self.sent: list[tuple[int, int, int | None]] = []

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        self.sent.append((address, data, devid))


def test_signal_msi_carries_the_device_id_and_a_late_id_reaches_every_vector() -> None:
    vm = RecordingVm()
    table = MsixTable(vm, 2)
    table.set_requester_id(0x10)
    table.set_control(True, False)
    table.write_table(0, (0x0809_0040).to_bytes(8, "little"))
    table.write_table(8, (7).to_bytes(4, "little"))
    table.write_table(12, (0).to_bytes(4, "little"))
    table.trigger(0)
    assert vm.sent == [(0x0809_0040, 7, 0x10)]
    table.set_requester_id(0x18)
    table.trigger(0)
    assert vm.sent[-1] == (0x0809_0040, 7, 0x18)
    assert all(vector.devid == 0x18 for vector in table.vectors)
