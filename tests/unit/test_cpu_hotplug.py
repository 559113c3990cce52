"""ACPI vCPU hotplug on the host's side (vmmkit.cpu_hotplug): the CSEL/status registers as the
guest's AML reads and writes them (CH's ``impl BusDevice for CpuManager``), the AML terms the
controller needs, and ``vm.resize``'s request checks. The AML run by acpiexec is
tests/unit/x86_64/test_x86_cpu_hotplug.py; Linux judging the whole is
tests/linux/test_linux_cpu_hotplug.py."""

from __future__ import annotations

import pytest

from vmmkit.acpi import aml
from vmmkit.cpu_hotplug import CCMD, CDAT, CEJ0, CINS, CPEN, CRMV, CSEL, STATUS, CpuHotplugController

ENTRIES = [bytes([0, 8, n, n, 1, 0, 0, 0]) for n in range(4)]


def controller(present: int = 2, *, refuse: bool = False) -> tuple[CpuHotplugController, list[int]]:
    ejected: list[int] = []

    def on_eject(index: int) -> bool:
        ejected.append(index)
        return not refuse

    return CpuHotplugController("_cpu_hotplug", present=present, processor_entries=ENTRIES,
                                on_eject=on_eject), ejected


def status(device: CpuHotplugController, index: int) -> int:
    device.write(CSEL, index.to_bytes(4, "little"))
    assert device.read(CSEL, 4) == index.to_bytes(4, "little")
    return device.read(STATUS, 1)[0]


def test_boot_vcpus_read_present_and_the_others_absent() -> None:
    device, _ = controller(2)
    assert [status(device, n) for n in range(4)] == [CPEN, CPEN, 0, 0]
    assert status(device, 200) == 0  # beyond max_vcpus: nothing there
    assert device.read(CCMD, 1) == b"\0" and device.read(CDAT, 4) == b"\0" * 4
    assert device.bad_accesses == 0


def test_an_insertion_is_announced_until_the_guest_acknowledges_it() -> None:
    device, _ = controller(2)
    device.insert(2)
    assert status(device, 2) == CPEN | CINS
    device.write(STATUS, bytes([CINS]))  # CSCN: Store(One, CINS), WriteAsZeros
    assert status(device, 2) == CPEN
    assert status(device, 3) == 0


def test_a_removal_is_requested_and_the_eject_carried_out_only_for_a_present_vcpu() -> None:
    device, ejected = controller(4)
    device.request_removal(3)
    assert status(device, 3) == CPEN | CRMV
    device.write(STATUS, bytes([CRMV]))
    assert status(device, 3) == CPEN
    device.write(STATUS, bytes([CEJ0]))  # CEJ0(3): CSEL is still 3
    assert ejected == [3] and status(device, 3) == 0 and device.ejects == 1
    device.write(STATUS, bytes([CEJ0]))  # again: nothing is there any more
    assert ejected == [3] and device.ejects == 1


def test_an_eject_the_machine_refuses_leaves_the_vcpu_present() -> None:
    device, ejected = controller(1, refuse=True)
    status(device, 0)
    device.write(STATUS, bytes([CEJ0]))
    assert ejected == [0] and status(device, 0) == CPEN and device.ejects == 0


@pytest.mark.parametrize(("offset", "data"), [(STATUS, b"\x08\x00"), (CSEL, b"\x01"), (2, b"\x01"), (12, b"\x01")])
def test_odd_writes_are_counted_and_change_nothing(offset: int, data: bytes) -> None:
    device, ejected = controller(2)
    status(device, 1)
    device.write(offset, data)
    assert device.bad_accesses == 1 and ejected == [] and status(device, 1) == CPEN


def test_odd_reads_answer_zero() -> None:
    device, _ = controller(2)
    assert device.read(STATUS, 4) == b"\0" * 4 and device.read(3, 1) == b"\0"
    assert device.bad_accesses == 2


def test_a_selection_beyond_max_is_harmless() -> None:
    device, ejected = controller(2)
    device.write(CSEL, (1 << 31).to_bytes(4, "little"))
    assert device.read(STATUS, 1) == b"\0"
    device.write(STATUS, bytes([CEJ0 | CINS]))
    assert ejected == [] and device.bad_accesses == 1


def test_reset_clears_pending_events_and_set_present_follows_the_machine() -> None:
    device, _ = controller(2)
    device.insert(2)
    device.request_removal(1)
    device.reset()
    assert [device.status(n) for n in range(4)] == [CPEN, CPEN, CPEN, 0]
    device.set_present(1)
    assert [device.status(n) for n in range(4)] == [CPEN, 0, 0, 0]


def test_the_present_count_must_fit() -> None:
    with pytest.raises(ValueError):
        CpuHotplugController("x", present=0, processor_entries=ENTRIES, on_eject=lambda n: True)
    with pytest.raises(ValueError):
        CpuHotplugController("x", present=5, processor_entries=ENTRIES, on_eject=lambda n: True)


def test_the_new_aml_terms_encode_as_the_spec_says() -> None:
    assert aml.While(aml.LLess(aml.Local(0), 4), [aml.Add(aml.Local(0), 1, aml.Local(0))]).to_aml() == \
        b"\xa2\x09\x95\x60\x0a\x04\x72\x60\x01\x60"
    # a reserved field is 0x00 and its width: "Field (PRST, ByteAcc, ...) { , 32, CPEN, 1 }"
    assert aml.Field("PRST", [("", 32), ("CPEN", 1)]).to_aml() == b"\x5b\x81\x0dPRST\x41\x00\x20CPEN\x01"
