"""KVM on AArch64 hosts: VMs, vCPUs and the in-kernel GICv3, registered as ``kvm`` on arm64
hosts (:mod:`vmmkit_kvm.plugin`). Written against Documentation/virt/kvm/api.rst and
devices/arm-vgic-v3.rst, and run in the AArch64 lab (``lab/``: Debian 12's arm64 kernel in QEMU
TCG with the virtualization extensions, a real ``/dev/kvm``).

The vCPU loop is C: the plugin's cffi module ``vmmkit_kvm._native`` built from arm64's
``<linux/kvm.h>`` (``runloop.c``, shared with x86-64; :mod:`vmmkit_kvm.native_loop`); the other
ioctls, none of them on a hot path, are ``ctypes`` calls on the libc with ``struct`` layouts.
Without the native module the backend says it is unavailable. The ABI used:

- ``KVM_CREATE_VM`` (type 0: the default 40-bit IPA space), ``KVM_SET_USER_MEMORY_REGION``;
- ``KVM_CREATE_VCPU``, then ``KVM_ARM_PREFERRED_TARGET`` and ``KVM_ARM_VCPU_INIT`` with the
  ``KVM_ARM_VCPU_PSCI_0_2`` feature (PSCI 0.2+ served by KVM: CPU_ON, CPU_OFF, AFFINITY_INFO,
  SYSTEM_OFF/RESET as ``KVM_EXIT_SYSTEM_EVENT``), and ``KVM_ARM_VCPU_POWER_OFF`` for every vCPU
  but 0, so secondaries wait for the guest's CPU_ON;
- ``KVM_GET_ONE_REG``/``KVM_SET_ONE_REG`` for the core registers (``KVM_REG_ARM_CORE``: offsets
  into ``struct kvm_regs``) and system registers (``KVM_REG_ARM64_SYSREG``);
- the in-kernel GICv3: ``KVM_CREATE_DEVICE`` (``KVM_DEV_TYPE_ARM_VGIC_V3``), the distributor and
  redistributor bases through ``KVM_DEV_ARM_VGIC_GRP_ADDR`` (the architecture's layout, the one
  its device tree describes), the number of IRQs, and ``KVM_DEV_ARM_VGIC_CTRL_INIT`` once every
  vCPU exists (done before the first ``KVM_RUN``); the architected timer is KVM's;
- ``KVM_IRQ_LINE`` with ``KVM_ARM_IRQ_TYPE_SPI`` (vmmkit GSIs are GIC INTIDs), irqfds with
  ``gsi = INTID - 32`` (KVM's default arm64 routing: pin + VGIC_NR_PRIVATE_IRQS), ioeventfds;
- MSIs through the in-kernel GICv3 ITS (devices/arm-vgic-its.rst), when the architecture asks
  for one (:meth:`KvmArm64Vm.set_gic_its`): ``KVM_CREATE_DEVICE`` (``KVM_DEV_TYPE_ARM_VGIC_ITS``)
  after the GIC, its base through ``KVM_VGIC_ITS_ADDR_TYPE``, ``KVM_DEV_ARM_VGIC_CTRL_INIT``
  after the GIC's. An MSI route is a ``KVM_IRQ_ROUTING_MSI`` entry with ``KVM_MSI_VALID_DEVID``
  and the sender's device ID (the PCI requester ID) at KVM GSI ``vmmkit GSI - 32``, as the
  SPIs' are; ``KVM_SET_GSI_ROUTING`` replaces the whole table, so it is written with the
  default SPI entries (KVM GSI n -> SPI n) for every GSI that carries no MSI, and written again
  after the vGIC's initialisation (which installs the defaults). ``KVM_SIGNAL_MSI`` with the
  device ID where no GSI is left (Cloud Hypervisor: ``hypervisor/src/kvm/aarch64/gic/``,
  ``KvmVm::make_routing_entry``);
- ``KVM_RUN`` in the native loop, ``kvm_run`` mmapped there: ``KVM_EXIT_MMIO`` goes to
  :class:`VcpuOps` (returned to Python, or through the ``extern "Python"`` callback with
  :attr:`KvmArm64Vcpu.callback_dispatch`; a read's data is written back for KVM to complete on the
  next run), ``KVM_EXIT_SYSTEM_EVENT`` becomes ``POWER_OFF``/``RESET``, ``EINTR`` with a pending
  kick ``INTERRUPTED``; :meth:`KvmArm64Vcpu.exit_counts` are the loop's counters.

Kicks set ``immediate_exit`` and send the native loop's kick signal to the vCPU's thread; its no-op
handler (no ``SA_RESTART``) is installed by the loop itself, from any thread. Known gap: no dirty log.

Snapshots: the vCPUs' registers, timer and power state and the vGIC's (with the ITS) in
vmmkit's backend-neutral types, read and written by :mod:`vmmkit_kvm.arm64_state`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, ClassVar, Final

import attrs

from vmmkit import aarch64_platform
from vmmkit.aarch64 import BOOT_PSTATE, CoreRegisters, CpuState, FirmwareHandler, PowerState, SysReg
from vmmkit.errors import CapabilityError, HypervisorError
from vmmkit.hypervisor import Availability, ExitReason, Hypervisor, Vcpu, VcpuOps, Vm, VmExit
from vmmkit.log import get_logger
from vmmkit.state import StateError

log = get_logger()

# -- ioctl numbers (the generic _IOC encoding arm64 uses) -------------------------------------
KVMIO: Final = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_GET_API_VERSION: Final = _ioc(_IOC_NONE, 0x00, 0)
KVM_CREATE_VM: Final = _ioc(_IOC_NONE, 0x01, 0)
KVM_CHECK_EXTENSION: Final = _ioc(_IOC_NONE, 0x03, 0)
KVM_GET_VCPU_MMAP_SIZE: Final = _ioc(_IOC_NONE, 0x04, 0)
KVM_CREATE_VCPU: Final = _ioc(_IOC_NONE, 0x41, 0)
KVM_SET_USER_MEMORY_REGION: Final = _ioc(_IOC_WRITE, 0x46, 32)
KVM_IRQ_LINE: Final = _ioc(_IOC_WRITE, 0x61, 8)
KVM_IRQFD: Final = _ioc(_IOC_WRITE, 0x76, 32)
KVM_IOEVENTFD: Final = _ioc(_IOC_WRITE, 0x79, 64)
KVM_RUN: Final = _ioc(_IOC_NONE, 0x80, 0)
KVM_GET_MP_STATE: Final = _ioc(_IOC_READ, 0x98, 4)
KVM_SET_MP_STATE: Final = _ioc(_IOC_WRITE, 0x99, 4)
KVM_GET_ONE_REG: Final = _ioc(_IOC_WRITE, 0xAB, 16)
KVM_SET_ONE_REG: Final = _ioc(_IOC_WRITE, 0xAC, 16)
KVM_ARM_VCPU_INIT: Final = _ioc(_IOC_WRITE, 0xAE, 32)
KVM_ARM_PREFERRED_TARGET: Final = _ioc(_IOC_READ, 0xAF, 32)
KVM_CREATE_DEVICE: Final = _ioc(_IOC_READ | _IOC_WRITE, 0xE0, 12)
KVM_SET_DEVICE_ATTR: Final = _ioc(_IOC_WRITE, 0xE1, 24)
KVM_SET_GSI_ROUTING: Final = _ioc(_IOC_WRITE, 0x6A, 8)
KVM_SIGNAL_MSI: Final = _ioc(_IOC_WRITE, 0xA5, 32)
KVM_ENABLE_CAP: Final = _ioc(_IOC_WRITE, 0xA3, 104)

KVM_API_VERSION: Final = 12
KVM_CAP_USER_MEMORY: Final = 3
KVM_CAP_IRQFD: Final = 32
KVM_CAP_IOEVENTFD: Final = 36
KVM_CAP_ONE_REG: Final = 70
KVM_CAP_ARM_PSCI_0_2: Final = 102
KVM_CAP_DEVICE_CTRL: Final = 89
KVM_CAP_IMMEDIATE_EXIT: Final = 136
KVM_CAP_IRQ_ROUTING: Final = 25
KVM_CAP_SIGNAL_MSI: Final = 77
#: Non-zero on a VM once it has an ITS: MSIs must then carry a device ID.
KVM_CAP_MSI_DEVID: Final = 131
#: Data aborts KVM cannot decode (no ISV: a load/store pair, writeback) exit as
#: KVM_EXIT_ARM_NISV with the faulting address instead of failing KVM_RUN with ENOSYS.
KVM_CAP_ARM_NISV_TO_USER: Final = 177
REQUIRED_CAPS: Final = (KVM_CAP_USER_MEMORY, KVM_CAP_ONE_REG, KVM_CAP_ARM_PSCI_0_2, KVM_CAP_DEVICE_CTRL,
                        KVM_CAP_IMMEDIATE_EXIT)

KVM_ARM_VCPU_POWER_OFF: Final = 0
KVM_ARM_VCPU_PSCI_0_2: Final = 2

# -- register ids -------------------------------------------------------------------------------
KVM_REG_ARM64: Final = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64: Final = 0x0030_0000_0000_0000
KVM_REG_ARM_CORE: Final = 0x0010 << 16
KVM_REG_ARM64_SYSREG: Final = 0x0013 << 16


def core_reg_id(offset: int) -> int:
    """The ONE_REG id of the 64-bit field at byte ``offset`` of ``struct kvm_regs``."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset // 4)


def sys_reg_id(reg: SysReg) -> int:
    op0, op1, crn, crm, op2 = reg.value
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2)


#: struct kvm_regs = { struct user_pt_regs { x[31], sp, pc, pstate }, sp_el1, elr_el1, ... }
REG_X: Final = tuple(core_reg_id(8 * i) for i in range(31))
REG_SP: Final = core_reg_id(8 * 31)
REG_PC: Final = core_reg_id(8 * 32)
REG_PSTATE: Final = core_reg_id(8 * 33)
REG_SP_EL1: Final = core_reg_id(8 * 34)

# -- the vGIC -----------------------------------------------------------------------------------
KVM_DEV_TYPE_ARM_VGIC_V3: Final = 7
KVM_DEV_ARM_VGIC_GRP_ADDR: Final = 0
KVM_DEV_ARM_VGIC_GRP_NR_IRQS: Final = 3
KVM_DEV_ARM_VGIC_GRP_CTRL: Final = 4
KVM_DEV_ARM_VGIC_CTRL_INIT: Final = 0
KVM_VGIC_V3_ADDR_TYPE_DIST: Final = 2
KVM_VGIC_V3_ADDR_TYPE_REDIST: Final = 3
KVM_ARM_IRQ_TYPE_SPI: Final = 1
GIC_NR_IRQS: Final = 256  #: INTIDs 0-255: 32 private + 224 SPIs
GIC_SPI_BASE: Final = 32
KVM_DEV_TYPE_ARM_VGIC_ITS: Final = 8
KVM_VGIC_ITS_ADDR_TYPE: Final = 4
#: GITS_TRANSLATER's offset from the ITS base (the second 64 KiB frame): where MSIs are written.
ITS_TRANSLATER_OFFSET: Final = 0x1_0040

# -- GSI routing (struct kvm_irq_routing_entry: gsi, type, flags, pad, a 32-byte union) ---------
KVM_IRQ_ROUTING_IRQCHIP: Final = 1
KVM_IRQ_ROUTING_MSI: Final = 2
KVM_MSI_VALID_DEVID: Final = 1 << 0
ROUTING_ENTRY_SIZE: Final = 48
#: KVM_MAX_IRQ_ROUTES: KVM GSIs are below this.
KVM_MAX_IRQ_ROUTES: Final = 4096


def irqchip_route(kvm_gsi: int, pin: int) -> bytes:
    """A ``KVM_IRQ_ROUTING_IRQCHIP`` entry: KVM GSI ``kvm_gsi`` raises SPI ``pin`` (INTID pin + 32)."""
    return struct.pack("<IIII II24x", kvm_gsi, KVM_IRQ_ROUTING_IRQCHIP, 0, 0, 0, pin)


def msi_route(kvm_gsi: int, address: int, data: int, devid: int) -> bytes:
    """A ``KVM_IRQ_ROUTING_MSI`` entry with ``KVM_MSI_VALID_DEVID``: address lo/hi, data, devid."""
    return struct.pack("<IIII IIII16x", kvm_gsi, KVM_IRQ_ROUTING_MSI, KVM_MSI_VALID_DEVID, 0,
                       address & 0xFFFF_FFFF, address >> 32, data & 0xFFFF_FFFF, devid)


def routing_table(msi_routes: dict[int, tuple[int, int, int]]) -> bytes:
    """``struct kvm_irq_routing`` (nr, flags, entries): the default SPI routes for every KVM GSI
    of the GIC's SPIs that carries no MSI, then the MSI routes (``{vmmkit GSI: (address, data,
    devid)}``; KVM GSI = vmmkit GSI - 32)."""
    msi_gsis = {gsi - GIC_SPI_BASE for gsi in msi_routes}
    entries = [irqchip_route(pin, pin) for pin in range(GIC_NR_IRQS - GIC_SPI_BASE) if pin not in msi_gsis]
    entries += [msi_route(gsi - GIC_SPI_BASE, address, data, devid)
                for gsi, (address, data, devid) in sorted(msi_routes.items())]
    return struct.pack("<II", len(entries), 0) + b"".join(entries)


def kvm_msi(address: int, data: int, devid: int) -> bytes:
    """``struct kvm_msi`` (address lo/hi, data, flags, devid, 12 bytes of padding)."""
    return struct.pack("<IIIII12x", address & 0xFFFF_FFFF, address >> 32, data & 0xFFFF_FFFF,
                       KVM_MSI_VALID_DEVID, devid)

# -- kvm_run ------------------------------------------------------------------------------------
KVM_EXIT_UNKNOWN: Final = 0
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_ARM_NISV: Final = 28
KVM_SYSTEM_EVENT_SHUTDOWN: Final = 1
KVM_SYSTEM_EVENT_RESET: Final = 2
KVM_MP_STATE_RUNNABLE: Final = 0
KVM_MP_STATE_STOPPED: Final = 5

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: Any = None, name: str = "ioctl") -> int:
    """One ioctl with the GIL released (ctypes); ``arg`` an int, a ctypes buffer or None."""
    if isinstance(arg, int):
        pointer: Any = ctypes.c_void_p(arg)
    elif arg is None:
        pointer = None
    else:
        pointer = ctypes.cast(arg, ctypes.c_void_p)
    result = _libc.ioctl(fd, request, pointer)
    if result < 0:
        raise HypervisorError(name, ctypes.get_errno())
    return int(result)


def native_loop() -> ModuleType:
    """:mod:`vmmkit_kvm.native_loop`, imported on first use (this module is imported on x86 hosts
    too, where the native module is x86's); :class:`CapabilityError` if it was not built."""
    try:
        from vmmkit_kvm import native_loop as loop
    except ImportError as exc:
        raise CapabilityError("vmmkit_kvm._native", None,
                              f"the KVM plugin's native run loop is not built for this host ({exc})") from None
    return loop


def _host_architectures() -> tuple[str, ...]:
    return ("aarch64",) if platform.machine() in ("aarch64", "arm64") else ()


class KvmArm64Hypervisor(Hypervisor):
    """KVM on an arm64 host: ``--hypervisor kvm`` there (see the module docstring)."""

    name: ClassVar[str] = "kvm"
    description: ClassVar[str] = "Linux KVM on arm64 (/dev/kvm): in-kernel GICv3, PSCI, irqfd, ioeventfd"
    priority: ClassVar[int] = 10
    architectures: ClassVar[tuple[str, ...]] = _host_architectures()

    @classmethod
    def preload(cls) -> None:
        native_loop().install_kick_handler()

    def __init__(self, path: str = "/dev/kvm", *, quirks: str | None = None) -> None:
        _refuse_quirks(quirks)
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if _ioctl(self.fd, KVM_GET_API_VERSION, None, "KVM_GET_API_VERSION") != KVM_API_VERSION:
            os.close(self.fd)
            raise CapabilityError("KVM_GET_API_VERSION", None, f"expected API version {KVM_API_VERSION}")
        self.mmap_size = _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, None, "KVM_GET_VCPU_MMAP_SIZE")

    @classmethod
    def is_available(cls) -> Availability:
        if not cls.architectures:
            return Availability(False, f"KVM on arm64 needs an arm64 host, not {platform.machine()}")
        try:
            fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return Availability(False, f"/dev/kvm: {exc.strerror}")
        try:
            missing = [cap for cap in REQUIRED_CAPS if _ioctl(fd, KVM_CHECK_EXTENSION, cap) <= 0]
        except HypervisorError as exc:
            return Availability(False, str(exc))
        finally:
            os.close(fd)
        if missing:
            return Availability(False, "missing KVM capabilities " + ", ".join(map(str, missing)))
        try:
            native_loop()
        except CapabilityError as exc:
            return Availability(False, str(exc))
        return Availability(True)

    def create_vm(self, arch: str = "aarch64") -> KvmArm64Vm:
        if arch != "aarch64" or not self.architectures:
            raise CapabilityError("KVM_CREATE_VM", None, f"cannot run {arch} guests on this host")
        missing = [cap for cap in REQUIRED_CAPS if _ioctl(self.fd, KVM_CHECK_EXTENSION, cap) <= 0]
        if missing:
            raise CapabilityError("KVM_CHECK_EXTENSION", None,
                                  "missing KVM capabilities " + ", ".join(map(str, missing)))
        native_loop().install_kick_handler()
        vm = KvmArm64Vm(_ioctl(self.fd, KVM_CREATE_VM, 0, "KVM_CREATE_VM"), self.mmap_size)
        if _ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_NISV_TO_USER) > 0:
            request = ctypes.create_string_buffer(struct.pack("<II4Q64x", KVM_CAP_ARM_NISV_TO_USER, 0, 0, 0, 0, 0))
            _ioctl(vm.fd, KVM_ENABLE_CAP, request, "KVM_ENABLE_CAP(ARM_NISV_TO_USER)")
        log.info("kvm.vm.created", arch="aarch64", ipa_bits=40, psci="in-kernel 0.2+")
        return vm

    def close(self) -> None:
        os.close(self.fd)


def _refuse_quirks(mode: str | None) -> None:
    """Host quirks are x86's (``pvm``): refuse them by name rather than ignore them."""
    from vmmkit_kvm import quirks

    try:
        requested = quirks._requested_mode(mode)
    except ValueError as exc:
        raise CapabilityError("host quirks", None, str(exc)) from None
    if requested == quirks.PVM:
        raise CapabilityError("host quirks", None, "--kvm-quirks pvm is for x86 KVM_PVM hosts; arm64 KVM has no quirks")


class KvmArm64Vm(Vm):
    """An arm64 KVM VM; implements :class:`vmmkit.aarch64.Aarch64Vm` (PSCI in the kernel)."""

    firmware_in_hypervisor = True
    supports_irqfd = True
    supports_ioeventfd = True

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        self.mmap_size = mmap_size
        self.vcpus: list[KvmArm64Vcpu] = []
        self._gic_fd: int | None = None
        self._gic_layout: tuple[int, int] | None = None
        self._gic_ready = False
        self._its_base: int | None = None
        self._its_fd: int | None = None
        #: vmmkit GSI -> (address, data, device ID): the MSI routes KVM's table carries.
        self._msi_routes: dict[int, tuple[int, int, int]] = {}
        self._lock = threading.Lock()
        self._slots: dict[int, tuple[int, int, int]] = {}
        self._native: Any = None  #: the run loop's per-VM state, made with the first vCPU
        #: The virtual count a restored VM goes on from, set when it first runs again (so that
        #: the time it spent being restored and paused is not the guest's).
        self._restored_count: int | None = None

    # Aarch64Vm

    def set_firmware_handler(self, handler: FirmwareHandler | None) -> None:
        """KVM serves PSCI itself: nothing to install."""

    def set_gic_layout(self, distributor: int, redistributors: int) -> None:
        self._gic_layout = (distributor, redistributors)

    def set_gic_its(self, base: int) -> bool:
        """The ITS is created with the GIC (:meth:`setup_interrupt_controller`, which fails if
        KVM refuses it); needs GSI routing for MSI routes."""
        if base & 0xFFFF:
            raise ValueError(f"the ITS base {base:#x} is not 64 KiB aligned")
        if _ioctl(self.fd, KVM_CHECK_EXTENSION, KVM_CAP_IRQ_ROUTING) <= 0:
            log.info("kvm.its.unavailable", reason="no KVM_CAP_IRQ_ROUTING")
            return False
        self._its_base = base
        return True

    @property
    def has_its(self) -> bool:
        return self._its_fd is not None

    # memory

    def add_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, *,
                          readonly: bool = False, log_dirty: bool = False) -> None:
        flags = (2 if readonly else 0) | (1 if log_dirty else 0)
        region = ctypes.create_string_buffer(struct.pack("<IIQQQ", slot, flags, guest_addr, size, host_addr))
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")
        self._slots[slot] = (guest_addr, size, host_addr)

    def remove_memory_region(self, slot: int) -> None:
        guest_addr, _, host_addr = self._slots.pop(slot)
        self.add_memory_region(slot, guest_addr, 0, host_addr)

    # vCPUs

    def create_vcpu(self, index: int, ops: VcpuOps) -> KvmArm64Vcpu:
        if self._gic_ready:
            raise HypervisorError("KVM_CREATE_VCPU", None, "all vCPUs must exist before the vGIC is initialised")
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            init = ctypes.create_string_buffer(32)
            _ioctl(self.fd, KVM_ARM_PREFERRED_TARGET, init, "KVM_ARM_PREFERRED_TARGET")
            target = struct.unpack_from("<I", init.raw, 0)[0]
            features = 1 << KVM_ARM_VCPU_PSCI_0_2
            if index != 0:
                features |= 1 << KVM_ARM_VCPU_POWER_OFF
            request = ctypes.create_string_buffer(struct.pack("<I7I", target, features, 0, 0, 0, 0, 0, 0))
            _ioctl(fd, KVM_ARM_VCPU_INIT, request, "KVM_ARM_VCPU_INIT")
            log.debug("kvm.vcpu.init", vcpu=index, target=target, features=hex(features))
            if self._native is None:
                self._native = native_loop().NativeVm(self.fd)
            vcpu = KvmArm64Vcpu(self, index, fd, ops)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    # interrupts

    def setup_interrupt_controller(self) -> None:
        """Create the in-kernel GICv3 at the layout given by :meth:`set_gic_layout` (the arch's
        0x08000000 / 0x080A0000 by default); it is initialised before the first run."""
        distributor, redistributors = self._gic_layout or (0x0800_0000, 0x080A_0000)
        device = ctypes.create_string_buffer(struct.pack("<III", KVM_DEV_TYPE_ARM_VGIC_V3, 0, 0))
        _ioctl(self.fd, KVM_CREATE_DEVICE, device, "KVM_CREATE_DEVICE(vgic-v3)")
        self._gic_fd = struct.unpack_from("<III", device.raw)[1]
        self._device_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, ctypes.c_uint64(distributor))
        self._device_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, ctypes.c_uint64(redistributors))
        self._device_attr(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, ctypes.c_uint32(GIC_NR_IRQS))
        log.info("kvm.vgic.created", model="GICv3 (in-kernel)", distributor=hex(distributor),
                 redistributors=hex(redistributors), irqs=GIC_NR_IRQS)
        if self._its_base is not None:
            self._create_its(self._its_base)

    def _create_its(self, base: int) -> None:
        device = ctypes.create_string_buffer(struct.pack("<III", KVM_DEV_TYPE_ARM_VGIC_ITS, 0, 0))
        try:
            _ioctl(self.fd, KVM_CREATE_DEVICE, device, "KVM_CREATE_DEVICE(vgic-its)")
        except HypervisorError as exc:
            raise CapabilityError("KVM_CREATE_DEVICE(vgic-its)", exc.errno,
                                  "this KVM cannot create a GICv3 ITS, which MSIs need") from None
        self._its_fd = struct.unpack_from("<III", device.raw)[1]
        self._device_attr(KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_ITS_ADDR_TYPE, ctypes.c_uint64(base), fd=self._its_fd)
        log.info("kvm.its.created", base=hex(base), translater=hex(base + ITS_TRANSLATER_OFFSET),
                 devid_required=_ioctl(self.fd, KVM_CHECK_EXTENSION, KVM_CAP_MSI_DEVID) > 0)

    def _device_attr(self, group: int, attr: int, value: Any, *, fd: int | None = None) -> None:
        fd = self._gic_fd if fd is None else fd
        assert fd is not None
        address = ctypes.addressof(value) if value is not None else 0
        request = ctypes.create_string_buffer(struct.pack("<IIQQ", 0, group, attr, address))
        _ioctl(fd, KVM_SET_DEVICE_ATTR, request, f"KVM_SET_DEVICE_ATTR(group {group}, attr {attr})")

    def finalize(self) -> None:
        """``KVM_DEV_ARM_VGIC_CTRL_INIT``, once, after the last vCPU was created."""
        with self._lock:
            if self._gic_fd is not None and not self._gic_ready:
                self._device_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, None)
                if self._its_fd is not None:
                    self._device_attr(KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, None, fd=self._its_fd)
                    if self._msi_routes:  # the vGIC's initialisation installed the default table
                        self._write_routes()
            self._gic_ready = True

    def before_run(self) -> None:
        """:meth:`finalize`, and a restored VM's virtual count, before a vCPU runs."""
        self.finalize()
        if self._restored_count is not None:
            with self._lock:
                if self._restored_count is not None:
                    from vmmkit_kvm import arm64_state as S

                    S.set_counter([vcpu._one_reg() for vcpu in self.vcpus], self._restored_count)
                    log.info("kvm.timer.restored", count=self._restored_count)
                    self._restored_count = None

    # snapshots (vmmkit.state.Snapshottable; the layout is vmmkit.aarch64_platform's)

    state_version: ClassVar[int] = aarch64_platform.STATE_VERSION

    def save_state(self) -> dict[str, Any]:
        """The in-kernel GICv3 (with the ITS and the tables it keeps in guest RAM, flushed there
        first) in the backend-neutral layout (:mod:`vmmkit_kvm.arm64_state`)."""
        from vmmkit_kvm import arm64_state as S

        if self._gic_fd is None:
            return aarch64_platform.platform_state()
        self.finalize()
        gic = S.DeviceAttrs(self._gic_fd, _ioctl)
        mpidrs = [vcpu.mpidr() for vcpu in self.vcpus]
        its = S.save_its(gic, S.DeviceAttrs(self._its_fd, _ioctl)) if self._its_fd is not None else None
        return aarch64_platform.platform_state(S.save_gic(gic, GIC_NR_IRQS, mpidrs), its)

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Every vCPU exists: the vGIC is initialised now and takes the saved registers; the
        vCPUs' MPIDRs are the saved ones (the architecture's, restored with the same indices)."""
        from vmmkit_kvm import arm64_state as S

        parsed = aarch64_platform.parse_platform_state(state)
        if parsed.gic is None:
            return  # saved by a backend without a GIC (emu): this one starts from its reset state
        if self._gic_fd is None:
            raise StateError("vm.gic: the snapshot has a GICv3 state; this VM has no interrupt controller")
        if parsed.its is not None and self._its_fd is None:
            raise StateError("vm.its: the snapshot has a GICv3 ITS state; this VM has no ITS")
        self.finalize()
        S.restore_gic(S.DeviceAttrs(self._gic_fd, _ioctl), parsed.gic, GIC_NR_IRQS,
                      [vcpu.mpidr() for vcpu in self.vcpus])
        if parsed.its is not None and self._its_fd is not None:
            S.restore_its(S.DeviceAttrs(self._its_fd, _ioctl), parsed.its)

    def set_irq_line(self, gsi: int, level: bool) -> None:
        if gsi < 32:
            raise ValueError(f"GSI {gsi} is not an SPI (INTIDs 32 and up)")
        request = ctypes.create_string_buffer(struct.pack("<II", (KVM_ARM_IRQ_TYPE_SPI << 24) | gsi, int(level)))
        _ioctl(self.fd, KVM_IRQ_LINE, request, "KVM_IRQ_LINE")

    def _require_its(self, what: str, devid: int | None) -> int:
        if self._its_fd is None:
            raise CapabilityError(what, None, "MSIs need the GICv3 ITS, which this VM was not given")
        if devid is None or not 0 <= devid <= 0xFFFF_FFFF:
            raise CapabilityError(what, None, "an MSI through the GICv3 ITS needs the sender's device ID "
                                  f"(its PCI requester ID), not {devid!r}")
        return devid

    def signal_msi(self, address: int, data: int, *, devid: int | None = None) -> None:
        """``KVM_SIGNAL_MSI`` with the device ID. A message to an address that is no ITS's
        translation register, or one the guest never mapped, goes nowhere, as on hardware."""
        devid = self._require_its("KVM_SIGNAL_MSI", devid)
        request = ctypes.create_string_buffer(kvm_msi(address, data, devid))
        try:
            _ioctl(self.fd, KVM_SIGNAL_MSI, request, "KVM_SIGNAL_MSI")
        except HypervisorError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENODEV):
                raise
            log.debug("kvm.msi.dropped", address=hex(address), data=data, devid=devid, errno=exc.errno)

    def set_msi_route(self, gsi: int, address: int, data: int, *, devid: int | None = None) -> None:
        devid = self._require_its("KVM_SET_GSI_ROUTING", devid)
        if not GIC_SPI_BASE <= gsi < GIC_SPI_BASE + KVM_MAX_IRQ_ROUTES:
            raise ValueError(f"GSI {gsi} is outside KVM's routing table")
        with self._lock:
            self._msi_routes[gsi] = (address & 0xFFFF_FFFF_FFFF_FFFF, data & 0xFFFF_FFFF, devid)
            if self._gic_ready:
                self._write_routes()

    def remove_msi_route(self, gsi: int) -> None:
        with self._lock:
            if self._msi_routes.pop(gsi, None) is not None and self._gic_ready:
                self._write_routes()

    def _write_routes(self) -> None:
        """``KVM_SET_GSI_ROUTING`` with the whole table (called with the lock held)."""
        table = ctypes.create_string_buffer(routing_table(self._msi_routes))
        _ioctl(self.fd, KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def register_irqfd(self, fd: int, gsi: int, resample_fd: int | None = None) -> None:
        self._irqfd(fd, gsi, 0, resample_fd)

    def unregister_irqfd(self, fd: int, gsi: int) -> None:
        self._irqfd(fd, gsi, 1, None)

    def _irqfd(self, fd: int, gsi: int, flags: int, resample_fd: int | None) -> None:
        if resample_fd is not None:
            flags |= 2
        request = ctypes.create_string_buffer(struct.pack("<IIII16x", fd, gsi - 32, flags, resample_fd or 0))
        _ioctl(self.fd, KVM_IRQFD, request, "KVM_IRQFD")

    def register_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                           datamatch: int | None = None) -> None:
        self._ioeventfd(fd, addr, pio, length, datamatch, deassign=False)

    def unregister_ioeventfd(self, fd: int, addr: int, *, pio: bool, length: int = 0,
                             datamatch: int | None = None) -> None:
        self._ioeventfd(fd, addr, pio, length, datamatch, deassign=True)

    def _ioeventfd(self, fd: int, addr: int, pio: bool, length: int, datamatch: int | None, *,
                   deassign: bool) -> None:
        if pio:
            raise CapabilityError("KVM_IOEVENTFD", None, "arm64 has no port I/O")
        flags = (1 if datamatch is not None else 0) | (4 if deassign else 0)
        request = ctypes.create_string_buffer(struct.pack("<QQIiI36x", datamatch or 0, addr, length, fd, flags))
        _ioctl(self.fd, KVM_IOEVENTFD, request, "KVM_IOEVENTFD")

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self._its_fd is not None:
            os.close(self._its_fd)
            self._its_fd = None
        if self._gic_fd is not None:
            os.close(self._gic_fd)
            self._gic_fd = None
        if self._native is not None:
            self._native.close()
            self._native = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmArm64Vcpu(Vcpu):
    """An arm64 KVM vCPU; implements :class:`vmmkit.aarch64.Aarch64Vcpu`."""

    def __init__(self, vm: KvmArm64Vm, index: int, fd: int, ops: VcpuOps) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        self.ops = ops
        self._loop: Any = native_loop().NativeVcpuLoop(vm._native, fd, vm.mmap_size, ops)

    # ONE_REG

    def _get(self, reg_id: int, name: str = "KVM_GET_ONE_REG") -> int:
        value = ctypes.c_uint64()
        request = ctypes.create_string_buffer(struct.pack("<QQ", reg_id, ctypes.addressof(value)))
        _ioctl(self.fd, KVM_GET_ONE_REG, request, name)
        return int(value.value)

    def _set(self, reg_id: int, value: int, name: str = "KVM_SET_ONE_REG") -> None:
        data = ctypes.c_uint64(value & 0xFFFF_FFFF_FFFF_FFFF)
        request = ctypes.create_string_buffer(struct.pack("<QQ", reg_id, ctypes.addressof(data)))
        _ioctl(self.fd, KVM_SET_ONE_REG, request, name)

    def get_core_registers(self) -> CoreRegisters:
        return CoreRegisters(x=tuple(self._get(r) for r in REG_X), sp=self._get(REG_SP_EL1), pc=self._get(REG_PC),
                             pstate=self._get(REG_PSTATE))

    def set_core_registers(self, regs: CoreRegisters) -> None:
        for reg_id, value in zip(REG_X, regs.x, strict=True):
            self._set(reg_id, value)
        self._set(REG_SP_EL1, regs.sp)
        self._set(REG_PC, regs.pc)
        self._set(REG_PSTATE, regs.pstate)

    def get_sys_reg(self, reg: SysReg) -> int:
        return self._get(sys_reg_id(reg), f"KVM_GET_ONE_REG({reg.name})")

    def set_sys_reg(self, reg: SysReg, value: int) -> None:
        self._set(sys_reg_id(reg), value, f"KVM_SET_ONE_REG({reg.name})")

    def mpidr(self) -> int:
        return self.get_sys_reg(SysReg.MPIDR_EL1)

    def power_state(self) -> PowerState:
        state = ctypes.c_uint32()
        _ioctl(self.fd, KVM_GET_MP_STATE, ctypes.addressof(state), "KVM_GET_MP_STATE")
        return PowerState.OFF if state.value == KVM_MP_STATE_STOPPED else PowerState.ON

    def power_on(self, entry: int, context: int) -> None:
        self.set_core_registers(CoreRegisters(x=(context,), pc=entry, pstate=BOOT_PSTATE))
        self._set_mp_state(KVM_MP_STATE_RUNNABLE)

    def power_off(self) -> None:
        self._set_mp_state(KVM_MP_STATE_STOPPED)

    def _set_mp_state(self, value: int) -> None:
        state = ctypes.c_uint32(value)
        _ioctl(self.fd, KVM_SET_MP_STATE, ctypes.addressof(state), "KVM_SET_MP_STATE")

    # snapshots (vmmkit.aarch64.Aarch64VcpuSnapshot)

    def _one_reg(self) -> Any:
        from vmmkit_kvm import arm64_state as S

        return S.OneReg(self.fd, _ioctl, KVM_GET_ONE_REG, KVM_SET_ONE_REG)

    def save_cpu_state(self) -> CpuState:
        """Every register ``KVM_GET_REG_LIST`` reports, the timer and the PSCI power state."""
        from vmmkit_kvm import arm64_state as S

        state = ctypes.c_uint32()
        _ioctl(self.fd, KVM_GET_MP_STATE, ctypes.addressof(state), "KVM_GET_MP_STATE")
        saved = S.save_cpu(self._one_reg(), S.get_reg_list(self.fd, _ioctl), state.value)
        pending = self.vm._restored_count
        if pending is not None:  # restored and not run since: the count it will go on from
            saved = attrs.evolve(saved, timer=attrs.evolve(saved.timer, count=pending))
        return saved

    def restore_cpu_state(self, state: CpuState) -> None:
        """The registers now; the virtual count when the VM first runs again: the earliest
        vCPU's (all of them read the one counter, one after the other, while the VM was paused)."""
        from vmmkit_kvm import arm64_state as S

        mp_state = S.restore_cpu(self._one_reg(), state, S.get_reg_list(self.fd, _ioctl), set_count=False)
        self._set_mp_state(mp_state)
        with self.vm._lock:
            pending = self.vm._restored_count
            self.vm._restored_count = state.timer.count if pending is None else min(pending, state.timer.count)

    # running

    def run(self) -> VmExit:
        self.vm.before_run()
        loop = native_loop()
        code, reason, words = self._loop.run()
        if code == loop.lib.VMK_EXIT_SYSTEM_EVENT:
            kind = words[0]
            if kind == KVM_SYSTEM_EVENT_RESET:
                return VmExit(ExitReason.RESET, "psci system-reset")
            if kind == KVM_SYSTEM_EVENT_SHUTDOWN:
                return VmExit(ExitReason.POWER_OFF, "psci system-off")
            return VmExit(ExitReason.SHUTDOWN, f"system event {kind}")
        if code == loop.lib.VMK_EXIT_INTERRUPTED:
            return VmExit(ExitReason.INTERRUPTED, "kicked")
        if reason == KVM_EXIT_ARM_NISV and len(words) == 2:
            iss, address = words
            return VmExit(ExitReason.INTERNAL_ERROR,
                          f"guest access at {address:#x} that KVM cannot emulate: no instruction syndrome "
                          f"(a load/store pair or a writeback addressing mode on MMIO; ESR ISS {iss:#x})")
        if code == loop.lib.VMK_EXIT_FAIL_ENTRY:
            return VmExit(ExitReason.FAIL_ENTRY, f"KVM_EXIT_FAIL_ENTRY (reason {words[0]:#x})")
        if code == loop.lib.VMK_EXIT_INTERNAL_ERROR:
            return VmExit(ExitReason.INTERNAL_ERROR, f"KVM_EXIT_INTERNAL_ERROR (suberror {words[0]})")
        if code == loop.lib.VMK_EXIT_BAD_RUN:
            return VmExit(ExitReason.INTERNAL_ERROR, f"KVM_EXIT_MMIO of {words[1]} bytes")
        return VmExit(ExitReason.INTERNAL_ERROR, f"unhandled KVM exit reason {reason}")

    def kick(self) -> None:
        self._loop.kick()

    def clear_kick(self) -> None:
        self._loop.clear_kick()

    @property
    def kicked(self) -> bool:
        return bool(self._loop.kicked())

    def exit_counts(self) -> dict[str, int]:
        return dict(self._loop.counts())

    @property
    def callback_dispatch(self) -> bool:
        """MMIO dispatched from inside the C loop (``extern "Python"``) instead of returning."""
        return bool(self._loop.callback)

    @callback_dispatch.setter
    def callback_dispatch(self, enabled: bool) -> None:
        self._loop.set_callback(enabled)

    def close(self) -> None:
        """Idempotent: the machine closes its vCPUs, then the VM closes whatever is left."""
        if self.fd < 0:
            return
        self._loop.close()
        os.close(self.fd)
        self.fd = -1


def vcpu_features(index: int) -> Sequence[int]:
    """The KVM_ARM_VCPU_INIT feature bits vCPU ``index`` is created with (for tests and docs)."""
    return (KVM_ARM_VCPU_PSCI_0_2,) if index == 0 else (KVM_ARM_VCPU_PSCI_0_2, KVM_ARM_VCPU_POWER_OFF)
