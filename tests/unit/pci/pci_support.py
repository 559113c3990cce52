"""Test doubles and a guest's-eye view of PCI for the tests in this folder.

- :class:`FakeVm` records ioeventfd, irqfd, MSI-route, MSI and IRQ-line calls and refuses what
  KVM refuses (a second ioeventfd on the same address, unregistering what is not registered).
- :class:`FakeMachine` is a real device manager over the fake VM.
- :class:`Driver` drives a virtio-pci function as drivers/virtio/virtio_pci_modern*.c does.
- :class:`Guest` accesses the buses as a vCPU does (through the Machine's ``VcpuDispatch``, so
  unclaimed reads are all ones) and replays what Linux does: ``pci_check_type1``,
  ``__pci_read_base`` (drivers/pci/probe.c), ``pci_find_capability`` and
  ``virtio_pci_find_capability`` (drivers/virtio/virtio_pci_modern_dev.c).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define

from vmmkit.arch import MemoryLayout
from vmmkit.config import VmConfig
from vmmkit.device import DeviceRequest
from vmmkit.device_manager import DeviceManager
from vmmkit.errors import HypervisorError
from vmmkit.eventloop import EventLoop
from vmmkit.hypervisor import Vcpu, VcpuOps, Vm
from vmmkit.machine import VcpuDispatch
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.pci import config as c
from vmmkit.pci import virtio as vp
from vmmkit.pci.msix import CONTROL_ENABLE, CONTROL_FUNCTION_MASK
from vmmkit.registry import Registries
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, ActivationContext, VirtioDevice

MIB = 1 << 20
GIB = 1 << 30

RAM = MemoryRange(0, 16 * MIB)
LAYOUT = MemoryLayout(
    ram=(RAM,),
    device_mmio=MemoryRange(0xD000_0000, 0x100_0000),
    pci_mmio32=MemoryRange(0xC000_0000, 0x1000_0000),
    pci_mmio64=MemoryRange(0x10_0000_0000, 0x10_0000_0000),
    pci_ecam=MemoryRange(0xE800_0000, 0x1000_0000),
    pio=MemoryRange(0x1000, 0xF000),
)


class FakeVm(Vm):
    def __init__(self, *, ioeventfd: bool = True, irqfd: bool = True) -> None:
        self.supports_ioeventfd = ioeventfd
        self.supports_irqfd = irqfd
        #: (addr, pio) -> (fd, length, datamatch)
        self.ioeventfds: dict[tuple[int, bool], tuple[int, int, int | None]] = {}
        self.irqfds: dict[int, int] = {}  # gsi -> fd
        self.msi_routes: dict[int, tuple[int, int]] = {}
        self.msis: list[tuple[int, int]] = []  # signal_msi calls
        self.devids: dict[int, int | None] = {}  # gsi -> the devid of its route
        self.lines: dict[int, bool] = {}
        self.line_history: list[tuple[int, bool]] = []
        self.calls: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    # the parts vmmkit.pci uses
    def register_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                           datamatch: int | None = None) -> None:
        self.calls.append(("register_ioeventfd", fd, addr, pio, length, datamatch))
        if (addr, pio) in self.ioeventfds:
            raise HypervisorError("KVM_IOEVENTFD", errno.EEXIST)
        self.ioeventfds[(addr, pio)] = (fd, length, datamatch)

    def unregister_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                             datamatch: int | None = None) -> None:
        self.calls.append(("unregister_ioeventfd", fd, addr, pio, length, datamatch))
        if self.ioeventfds.get((addr, pio)) != (fd, length, datamatch):
            raise HypervisorError("KVM_IOEVENTFD", errno.ENOENT)
        del self.ioeventfds[(addr, pio)]

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        self.calls.append(("register_irqfd", fd, gsi))
        if gsi in self.irqfds:
            raise HypervisorError("KVM_IRQFD", errno.EBUSY)
        self.irqfds[gsi] = fd

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        self.calls.append(("unregister_irqfd", fd, gsi))
        if self.irqfds.get(gsi) != fd:
            raise HypervisorError("KVM_IRQFD", errno.ENOENT)
        del self.irqfds[gsi]

    def set_msi_route(self, gsi: int, address: int, data: int, *, devid: int | None = None) -> None:
        self.calls.append(("set_msi_route", gsi, address, data))
        self.devids[gsi] = devid
        self.msi_routes[gsi] = (address, data)

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        with self._lock:
            self.msis.append((address, data))

    def set_irq_line(self, gsi: int, level: bool) -> None:
        with self._lock:
            self.lines[gsi] = level
            self.line_history.append((gsi, level))

    # what a guest's access would do
    def ioeventfd_at(self, addr: int) -> int | None:
        entry = self.ioeventfds.get((addr, False))
        return entry[0] if entry is not None else None

    def delivered(self) -> list[tuple[int, int]]:
        """MSIs the hypervisor would have injected: signal_msi calls plus irqfd kicks through
        their routes (each irqfd's count is consumed)."""
        out = list(self.msis)
        self.msis.clear()
        for gsi, fd in self.irqfds.items():
            try:
                count = os.eventfd_read(fd)
            except BlockingIOError:
                continue
            if gsi in self.msi_routes:
                out.extend([self.msi_routes[gsi]] * count)
        return out

    # unused by these tests
    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, *,
                          readonly: bool = False, log_dirty: bool = False) -> None: ...

    def remove_memory_region(self, slot: int) -> None: ...

    def create_vcpu(self, index: int, ops: VcpuOps) -> Vcpu:
        raise NotImplementedError

    def setup_interrupt_controller(self) -> None: ...


class FakeMachine(DeviceManager):
    """A real :class:`vmmkit.device_manager.DeviceManager` (buses, allocators, PCI segments)
    over a recording :class:`FakeVm`, with a :class:`Guest` to access it as a vCPU does."""

    def __init__(self, vm: Vm, memory: GuestMemory, layout: MemoryLayout = LAYOUT) -> None:
        super().__init__(vm=vm, memory=memory, layout=layout, config=VmConfig(),
                         event_loop=EventLoop(name="test-events"), registries=Registries(),
                         context=None,  # type: ignore[arg-type]  # these tests place built devices
                         virtio_transport="pci")
        self.guest = Guest(self)

    def close(self) -> None:
        super().close()
        self.event_loop.close()


# -- a fake virtio device ----------------------------------------------------------------


class FakeDevice(VirtioDevice):
    """A virtio device (type 4, entropy) that records what the transport does to it."""

    device_type = 4
    name = "fake"

    def __init__(self, device_id: str = "fake0", *, sizes: Sequence[int] = (256,),
                 offered: int = VIRTIO_F_VERSION_1 | (1 << 28) | 0x5) -> None:
        super().__init__(device_id)
        self.sizes = tuple(sizes)
        self.offered = offered
        self.config = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")
        self.contexts: list[ActivationContext] = []
        self.resets = 0
        self.fail_activate = False
        self.config_writes: list[tuple[int, bytes]] = []
        self.closed = False

    @property
    def queue_max_sizes(self) -> Sequence[int]:
        return self.sizes

    def features(self) -> int:
        return self.offered

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))

    def activate(self, ctx: ActivationContext) -> None:
        if self.fail_activate:
            raise RuntimeError("cannot start")
        self.contexts.append(ctx)

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    def close(self) -> None:
        self.closed = True


def virtio_request(device_id: str = "rng0", *, pci_device_id: int | None = None,
                   pci_segment: int = 0) -> DeviceRequest:
    return DeviceRequest("rng", device_id, None, transport="pci", pci_segment=pci_segment,
                         pci_slot=pci_device_id)


# -- the guest's side ----------------------------------------------------------------------

PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_CAPABILITY_LIST = 0x34
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x06
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_IO_MASK = 0xFFFF_FFFC
PCI_BASE_ADDRESS_MEM_MASK = 0xFFFF_FFF0
IO_SPACE_LIMIT = 0xFFFF
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_FIND_CAP_TTL = 48


@define
class ProbedBar:
    index: int
    address: int
    size: int
    io: bool
    mem64: bool
    prefetch: bool


class ConfigAccess:
    """One configuration mechanism: ``read(bus, dev, fn, reg, size)`` / ``write(...)``."""

    def read(self, bus: int, dev: int, fn: int, reg: int, size: int) -> int:
        raise NotImplementedError

    def write(self, bus: int, dev: int, fn: int, reg: int, size: int, value: int) -> None:
        raise NotImplementedError


class ConfigIoAccess(ConfigAccess):
    """Mechanism #1 as Linux's pci_conf1_read/write does it (arch/x86/pci/direct.c)."""

    def __init__(self, cpu: VcpuDispatch) -> None:
        self.cpu = cpu

    def _address(self, bus: int, dev: int, fn: int, reg: int) -> None:
        value = 0x8000_0000 | (bus << 16) | (dev << 11) | (fn << 8) | (reg & 0xFC)
        self.cpu.pio_write(0xCF8, value.to_bytes(4, "little"))

    def read(self, bus: int, dev: int, fn: int, reg: int, size: int) -> int:
        self._address(bus, dev, fn, reg)
        return int.from_bytes(self.cpu.pio_read(0xCFC + (reg & 3), size), "little")

    def write(self, bus: int, dev: int, fn: int, reg: int, size: int, value: int) -> None:
        self._address(bus, dev, fn, reg)
        self.cpu.pio_write(0xCFC + (reg & 3), value.to_bytes(size, "little"))


class EcamAccess(ConfigAccess):
    def __init__(self, cpu: VcpuDispatch, base: int) -> None:
        self.cpu = cpu
        self.base = base

    def _addr(self, bus: int, dev: int, fn: int, reg: int) -> int:
        return self.base + (bus << 20) + (dev << 15) + (fn << 12) + reg

    def read(self, bus: int, dev: int, fn: int, reg: int, size: int) -> int:
        return int.from_bytes(self.cpu.mmio_read(self._addr(bus, dev, fn, reg), size), "little")

    def write(self, bus: int, dev: int, fn: int, reg: int, size: int, value: int) -> None:
        self.cpu.mmio_write(self._addr(bus, dev, fn, reg), value.to_bytes(size, "little"))


class Function:
    """One function as a driver sees it, through one configuration mechanism."""

    def __init__(self, cfg: ConfigAccess, dev: int, fn: int = 0, bus: int = 0) -> None:
        self.cfg, self.bus, self.dev, self.fn = cfg, bus, dev, fn

    def read8(self, reg: int) -> int:
        return self.cfg.read(self.bus, self.dev, self.fn, reg, 1)

    def read16(self, reg: int) -> int:
        return self.cfg.read(self.bus, self.dev, self.fn, reg, 2)

    def read32(self, reg: int) -> int:
        return self.cfg.read(self.bus, self.dev, self.fn, reg, 4)

    def write8(self, reg: int, value: int) -> None:
        self.cfg.write(self.bus, self.dev, self.fn, reg, 1, value)

    def write16(self, reg: int, value: int) -> None:
        self.cfg.write(self.bus, self.dev, self.fn, reg, 2, value)

    def write32(self, reg: int, value: int) -> None:
        self.cfg.write(self.bus, self.dev, self.fn, reg, 4, value)

    # drivers/pci/probe.c
    def read_base(self, pos: int) -> ProbedBar | None:
        """``__pci_read_base`` for a standard BAR at config offset ``pos``."""
        orig_cmd = self.read16(PCI_COMMAND)
        decode = PCI_COMMAND_IO | PCI_COMMAND_MEMORY
        if orig_cmd & decode:
            self.write16(PCI_COMMAND, orig_cmd & ~decode)
        low = self.read32(pos)
        self.write32(pos, low | 0xFFFF_FFFF)
        sz = self.read32(pos)
        self.write32(pos, low)
        if sz == 0xFFFF_FFFF:
            sz = 0
        if low == 0xFFFF_FFFF:
            low = 0
        io = bool(low & PCI_BASE_ADDRESS_SPACE_IO)
        mem64 = not io and (low & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64
        prefetch = not io and bool(low & PCI_BASE_ADDRESS_MEM_PREFETCH)
        if io:
            l64, sz64, mask64 = low & PCI_BASE_ADDRESS_IO_MASK, sz & PCI_BASE_ADDRESS_IO_MASK, \
                PCI_BASE_ADDRESS_IO_MASK & IO_SPACE_LIMIT
        else:
            l64, sz64, mask64 = low & PCI_BASE_ADDRESS_MEM_MASK, sz & PCI_BASE_ADDRESS_MEM_MASK, \
                PCI_BASE_ADDRESS_MEM_MASK
        if mem64:
            high = self.read32(pos + 4)
            self.write32(pos + 4, 0xFFFF_FFFF)
            sz_high = self.read32(pos + 4)
            self.write32(pos + 4, high)
            l64 |= high << 32
            sz64 |= sz_high << 32
            mask64 |= 0xFFFF_FFFF << 32
        if orig_cmd & decode:
            self.write16(PCI_COMMAND, orig_cmd)
        if not sz64:
            return None
        size = pci_size(l64, sz64, mask64)
        if not size:
            return None
        return ProbedBar((pos - 0x10) // 4, l64, size, io, mem64, prefetch)

    def read_bases(self) -> dict[int, ProbedBar]:
        """``pci_read_bases`` for the six BARs of a type-0 header."""
        bars: dict[int, ProbedBar] = {}
        pos = 0x10
        while pos < 0x28:
            bar = self.read_base(pos)
            if bar is not None:
                bars[bar.index] = bar
            pos += 8 if bar is not None and bar.mem64 else 4
        return bars

    # drivers/pci/pci.c
    def find_capability(self, cap: int, start: int | None = None) -> int:
        """``pci_find_capability`` (``start``: ``pci_find_next_capability`` after it)."""
        if start is None:
            if not self.read16(PCI_STATUS) & PCI_STATUS_CAP_LIST:
                return 0
            pos = self.read8(PCI_CAPABILITY_LIST)
        else:
            pos = self.read8(start + 1)
        ttl = PCI_FIND_CAP_TTL
        while ttl:
            ttl -= 1
            if pos < 0x40:
                break
            pos &= ~3
            ent = self.read16(pos)
            cap_id = ent & 0xFF
            if cap_id == 0xFF:
                break
            if cap_id == cap:
                return pos
            pos = ent >> 8
        return 0

    def virtio_find_capability(self, cfg_type: int, bars: dict[int, ProbedBar]) -> int:
        """``virtio_pci_find_capability``: the first vendor capability of ``cfg_type`` whose
        BAR exists."""
        pos = self.find_capability(PCI_CAP_ID_VNDR)
        while pos > 0:
            type_ = self.read8(pos + 3)
            bar = self.read8(pos + 4)
            if bar <= 5 and type_ == cfg_type and bar in bars and bars[bar].size:
                return pos
            pos = self.find_capability(PCI_CAP_ID_VNDR, pos)
        return 0


def pci_size(base: int, maxbase: int, mask: int) -> int:
    size = mask & maxbase
    if not size:
        return 0
    size = size & ~(size - 1)
    if base == maxbase and ((base | (size - 1)) & mask) != mask:
        return 0
    return size


class Guest:
    """A vCPU's view of a :class:`FakeMachine`."""

    def __init__(self, machine: FakeMachine) -> None:
        self.cpu = VcpuDispatch(machine.pio_bus, machine.mmio_bus)
        self.cf8 = ConfigIoAccess(self.cpu)
        ecam = machine.layout.pci_ecam
        self.ecam = EcamAccess(self.cpu, ecam.start if ecam is not None else 0)
        self.vm = machine.vm

    def function(self, dev: int, *, ecam: bool = False) -> Function:
        return Function(self.ecam if ecam else self.cf8, dev)

    def read(self, addr: int, size: int) -> int:
        return int.from_bytes(self.cpu.mmio_read(addr, size), "little")

    def write(self, addr: int, size: int, value: int) -> None:
        """An MMIO write as the hypervisor would see it: an ioeventfd on the address takes it
        without an exit (KVM's length-0 ioeventfds match any width)."""
        fd = self.vm.ioeventfd_at(addr) if isinstance(self.vm, FakeVm) else None
        if fd is not None:
            os.eventfd_write(fd, 1)
            return
        self.cpu.mmio_write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# -- a virtio-pci driver ------------------------------------------------------------------

MSI_ADDRESS = 0xFEE0_0000
S_ACK, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, S_FAILED = 1, 2, 4, 8, 0x40, 0x80
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000


class Driver:
    """What drivers/virtio/virtio_pci_modern*.c does, through a guest's accesses."""

    def __init__(self, machine: FakeMachine, slot: int, *, ecam: bool = False) -> None:
        self.guest = machine.guest
        self.fn: Function = machine.guest.function(slot, ecam=ecam)
        fn = self.fn
        # pci_enable_device + pci_set_master
        fn.write16(c.COMMAND, fn.read16(c.COMMAND) | c.COMMAND_MEMORY | c.COMMAND_MASTER)
        self.bars = fn.read_bases()
        self.caps = {t: fn.virtio_find_capability(t, self.bars) for t in range(1, 6)}

        def where(cfg_type: int) -> int:
            pos = self.caps[cfg_type]
            bar, offset = fn.read8(pos + 4), fn.read32(pos + 8)
            return self.bars[bar].address + offset

        self.common = where(vp.VIRTIO_PCI_CAP_COMMON_CFG)
        self.isr = where(vp.VIRTIO_PCI_CAP_ISR_CFG)
        self.device = where(vp.VIRTIO_PCI_CAP_DEVICE_CFG)
        self.notify = where(vp.VIRTIO_PCI_CAP_NOTIFY_CFG)
        self.multiplier = fn.read32(self.caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG] + 16)
        self.msix_cap = fn.find_capability(c.CAP_ID_MSIX)

    def r(self, offset: int, size: int) -> int:
        return self.guest.read(self.common + offset, size)

    def w(self, offset: int, size: int, value: int) -> None:
        self.guest.write(self.common + offset, size, value)

    @property
    def status(self) -> int:
        return self.r(vp.DEVICE_STATUS, 1)

    def add_status(self, bits: int) -> None:
        self.w(vp.DEVICE_STATUS, 1, self.status | bits)

    def reset(self) -> None:
        self.w(vp.DEVICE_STATUS, 1, 0)
        assert self.status == 0  # vp_reset polls until it reads 0

    def features(self) -> int:
        self.w(vp.DEVICE_FEATURE_SELECT, 4, 0)
        low = self.r(vp.DEVICE_FEATURE, 4)
        self.w(vp.DEVICE_FEATURE_SELECT, 4, 1)
        return low | self.r(vp.DEVICE_FEATURE, 4) << 32

    def negotiate(self, features: int) -> bool:
        self.reset()
        self.add_status(S_ACK)
        self.add_status(S_DRIVER)
        self.w(vp.DRIVER_FEATURE_SELECT, 4, 0)
        self.w(vp.DRIVER_FEATURE, 4, features & 0xFFFF_FFFF)
        self.w(vp.DRIVER_FEATURE_SELECT, 4, 1)
        self.w(vp.DRIVER_FEATURE, 4, features >> 32)
        self.add_status(S_FEATURES_OK)
        return bool(self.status & S_FEATURES_OK)

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int,
                    vector: int = vp.VIRTIO_MSI_NO_VECTOR) -> int:
        self.w(vp.QUEUE_SELECT, 2, index)
        self.w(vp.QUEUE_SIZE, 2, size)
        for offset, address in ((vp.QUEUE_DESC, desc), (vp.QUEUE_DRIVER, avail), (vp.QUEUE_DEVICE, used)):
            self.w(offset, 4, address & 0xFFFF_FFFF)  # vp_iowrite64_twopart
            self.w(offset + 4, 4, address >> 32)
        self.w(vp.QUEUE_MSIX_VECTOR, 2, vector)
        return self.r(vp.QUEUE_MSIX_VECTOR, 2)

    def enable_queue(self, index: int) -> None:
        self.w(vp.QUEUE_SELECT, 2, index)
        self.w(vp.QUEUE_ENABLE, 2, 1)

    def kick(self, index: int) -> None:
        self.w(vp.QUEUE_SELECT, 2, index)
        off = self.r(vp.QUEUE_NOTIFY_OFF, 2)
        self.guest.write(self.notify + off * self.multiplier, 2, index)

    # MSI-X as pci_msix_enable + msix_setup_interrupts + unmasking does it
    def enable_msix(self, vectors: int) -> None:
        ctrl = self.msix_cap + 2
        self.fn.write16(ctrl, self.fn.read16(ctrl) | CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
        table_reg = self.fn.read32(self.msix_cap + 4)
        table = self.bars[table_reg & 7].address + (table_reg & ~7)
        for i in range(vectors):
            entry = table + 16 * i
            self.guest.write(entry + 12, 4, 1)
            self.guest.write(entry, 4, MSI_ADDRESS)
            self.guest.write(entry + 4, 4, 0)
            self.guest.write(entry + 8, 4, 0x40 + i)
        self.fn.write16(ctrl, self.fn.read16(ctrl) & ~CONTROL_FUNCTION_MASK)
        for i in range(vectors):
            self.guest.write(table + 16 * i + 12, 4, 0)
        self.table = table

    def read_isr(self) -> int:
        return self.guest.read(self.isr, 1)


def write_ring(memory: GuestMemory, size: int = 8, buffer: int = 0x20000, length: int = 16) -> None:
    """One device-writable descriptor made available (split ring at DESC/AVAIL/USED)."""
    memory.write(DESC, struct.pack("<QIHH", buffer, length, 2, 0))
    memory.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    memory.write(USED, bytes(6 + 8 * size))
