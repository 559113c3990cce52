"""The checked-bindings layer refuses bad arguments before any system call, and the native
bounds check on KVM_EXIT_IO agrees with its Python reference. Needs the built extension but
not /dev/kvm."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

bindings = pytest.importorskip("vmmkit_kvm.bindings", reason="the vmmkit-kvm extension is not built")

from vmmkit_kvm.hypervisor import _translate  # noqa: E402

from vmmkit.hypervisor import ExitReason  # noqa: E402


@pytest.fixture
def vm_fd():
    """A KvmVmFd on /dev/null: argument checks run, any ioctl that got through would fail."""
    fd = os.open("/dev/null", os.O_RDWR)
    vm = bindings.KvmVmFd(fd, None)
    yield vm
    vm.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(slot=-1, guest_addr=0, size=0x1000, host_addr=0x1000),
        dict(slot=0x8000, guest_addr=0, size=0x1000, host_addr=0x1000),
        dict(slot=0, guest_addr=0x10, size=0x1000, host_addr=0x1000),
        dict(slot=0, guest_addr=0, size=0x1001, host_addr=0x1000),
        dict(slot=0, guest_addr=0, size=0x1000, host_addr=0x1004),
        dict(slot=0, guest_addr=0, size=0x1000, host_addr=0),
        dict(slot=0, guest_addr=1 << 64, size=0x1000, host_addr=0x1000),
        dict(slot=0, guest_addr=(1 << 64) - 0x1000, size=0x2000, host_addr=0x1000),
        dict(slot=True, guest_addr=0, size=0x1000, host_addr=0x1000),
    ],
)
def test_memory_region_arguments_are_checked(vm_fd, kwargs) -> None:
    with pytest.raises(ValueError):
        vm_fd.set_user_memory_region(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(fd=-1, addr=0x500, pio=True, length=1),
        dict(fd=3, addr=0x500, pio=True, length=3),
        dict(fd=3, addr=0x500, pio=True, length=8),  # ports are at most 4 bytes wide
        dict(fd=3, addr=0x10000, pio=True, length=1),
        dict(fd=3, addr=0xFFFF, pio=True, length=2),
        dict(fd=3, addr=0x500, pio=True, length=0, datamatch=1),
        dict(fd=3, addr=0x500, pio=True, length=1, datamatch=0x100),
        dict(fd=3, addr=0x500, pio=True, length=2, datamatch=-1),
        dict(fd=3, addr=(1 << 64) - 2, pio=False, length=4),
    ],
)
def test_ioeventfd_arguments_are_checked(vm_fd, kwargs) -> None:
    with pytest.raises(ValueError):
        vm_fd.ioeventfd(**kwargs)


def test_interrupt_arguments_are_checked(vm_fd) -> None:
    for call in (
        lambda: vm_fd.irqfd(-1, 5),
        lambda: vm_fd.irqfd(3, -5),
        lambda: vm_fd.irqfd(3, vm_fd.max_gsi),
        lambda: vm_fd.irqfd(3, 5, resample_fd=-2),
        lambda: vm_fd.irqfd(3, 5, resample_fd=4, deassign=True),
        lambda: vm_fd.irq_line(1 << 40, True),
        lambda: vm_fd.signal_msi(-1, 0),
        lambda: vm_fd.signal_msi(0xFEE00000, 1 << 32),
        lambda: vm_fd.set_gsi_routing({5: (0xFEE00000, 0x40)}),  # below 24: the legacy routes
        lambda: vm_fd.set_gsi_routing({24: (0xFEE00000, 1 << 32)}),
    ):
        with pytest.raises(ValueError):
            call()


def test_platform_and_sink_arguments_are_checked(vm_fd) -> None:
    for call in (
        lambda: vm_fd.set_tss_addr(0xFFFB_D001),
        lambda: vm_fd.set_tss_addr(0xFFFF_F000),  # three pages must fit below 4 GiB
        lambda: vm_fd.set_identity_map_addr(1 << 32),
        lambda: vm_fd.coalesced_zone(0xFFFF, 2, pio=True),
        lambda: vm_fd.coalesced_zone(0x1000, 0, pio=False),
        lambda: vm_fd.add_sink(0x10000, 1, timestamp=False, read_value=0, label=""),
        lambda: vm_fd.add_sink(0xE9, -1, timestamp=False, read_value=0, label=""),
        lambda: vm_fd.add_sink(0xE9, 1, timestamp=False, read_value=0x100, label=""),
        lambda: vm_fd.add_sink(0xE9, 1, timestamp=True, read_value=0, label="a\0b"),
        lambda: vm_fd.create_vcpu(-1),
        lambda: vm_fd.get_dirty_log(0, 0),
        lambda: vm_fd.enable_cap(1, 1, 2, 3, 4, 5),
    ):
        with pytest.raises(ValueError):
            call()


def test_an_ioctl_that_passes_the_checks_names_itself_when_it_fails(vm_fd) -> None:
    from vmmkit.errors import HypervisorError

    with pytest.raises(HypervisorError) as info:
        vm_fd.create_irqchip()  # /dev/null is not a VM
    assert info.value.call == "KVM_CREATE_IRQCHIP" and info.value.errno is not None


def test_sink_table_is_bounded(vm_fd) -> None:
    for port in range(bindings.lib.VMK_MAX_SINKS):
        assert vm_fd.add_sink(0x100 + port, 1, timestamp=False, read_value=0xFF, label="")
    assert not vm_fd.add_sink(0x300, 1, timestamp=False, read_value=0xFF, label="")
    assert vm_fd.remove_sink(0x100)
    assert not vm_fd.remove_sink(0x100)
    assert vm_fd.add_sink(0x300, 1, timestamp=False, read_value=0xFF, label="")


def _io_in_bounds_reference(run_size: int, size: int, count: int, offset: int) -> bool:
    return (
        size in (1, 2, 4)
        and count > 0
        and bindings.kvm_run_struct_size() <= offset <= run_size
        and offset + size * count <= run_size
    )


@given(
    run_size=st.sampled_from([0, 4096, 8192, 12288, (1 << 64) - 1]),
    size=st.one_of(st.sampled_from([0, 1, 2, 3, 4, 8]), st.integers(0, (1 << 32) - 1)),
    count=st.one_of(st.integers(0, 8192), st.integers(0, (1 << 32) - 1)),
    offset=st.one_of(st.integers(0, 16384), st.integers(0, (1 << 64) - 1)),
)
def test_native_io_bounds_check_matches_the_reference(run_size, size, count, offset) -> None:
    assert bindings.io_in_bounds(run_size, size, count, offset) == _io_in_bounds_reference(
        run_size, size, count, offset
    )


def test_exit_translation() -> None:
    E = bindings.ExitCode
    insn = bytes([2, 0xCD, 0x80]) + bytes(13)
    words = (1, 1, int.from_bytes(insn[:8], "little"), int.from_bytes(insn[8:], "little"), 0x10)
    exit_, info = _translate(bindings.RawExit(E.INTERNAL_ERROR, 17, words))
    assert exit_.reason is ExitReason.INTERNAL_ERROR
    assert "emulation failure" in exit_.detail and "instruction cd 80" in exit_.detail
    assert info.instruction == b"\xcd\x80"
    assert _translate(bindings.RawExit(E.SYSTEM_EVENT, 24, (2,)))[0].reason is ExitReason.RESET
    assert _translate(bindings.RawExit(E.SYSTEM_EVENT, 24, (1,)))[0].reason is ExitReason.POWER_OFF
    fail = _translate(bindings.RawExit(E.FAIL_ENTRY, 9, (0x80000021, 1)))[0]
    assert fail.reason is ExitReason.FAIL_ENTRY and "0x80000021" in fail.detail
    bad = _translate(bindings.RawExit(E.BAD_RUN, 2, (1, 3, 2, 99999)))[0]
    assert bad.reason is ExitReason.INTERNAL_ERROR and "out of bounds" in bad.detail
    unknown = _translate(bindings.RawExit(E.UNKNOWN, 77, (0,)))[0]
    assert "77" in unknown.detail
