"""cffi build script for ``vmmkit_kvm._native`` (out-of-line API mode).

Kernel structures are declared with ``...;`` wherever cffi allows it, so the C compiler fills
their layouts in from ``<linux/kvm.h>``. cffi cannot make a struct partial when it has an
anonymous member (``union { ... };``); those few are declared in full and cffi checks every
offset and the total size against the compiler's at build time, so a wrong declaration fails
the build instead of corrupting an ioctl.

One module, ``vmmkit_kvm._native``, per host architecture: the common part (the run loop of
``runloop.c``, the generic ``<linux/kvm.h>`` constants) and the architecture's own (x86-64: the
register, CPUID, MSR, LAPIC, PIT and XSAVE structures and ioctls, the sync-regs accessors;
aarch64: its exit constants, as the arm64 backend does its other ioctls with ``ctypes``).
:func:`builder_for` gives the builder of either; ``lab/cross.py`` builds the lab's with it.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

COMMON_CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

/* -- generic <linux/kvm.h> constants ------------------------------------------------------ */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_CREATE_VCPU ...
#define KVM_RUN ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_INTERNAL_ERROR_EMULATION ...

"""

X86_CDEF = r"""
/* -- ioctl numbers and flags -------------------------------------------------------------- */
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_RESET_DIRTY_RINGS ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...
#define KVM_EXIT_DIRTY_RING_FULL ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQ_LINE_STATUS ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SIGNAL_MSI ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_REGISTER_COALESCED_MMIO ...
#define KVM_UNREGISTER_COALESCED_MMIO ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_ENABLE_CAP ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_GET_CPUID2 ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_TSC_KHZ ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_SET_GUEST_DEBUG ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_COALESCED_MMIO ...
#define KVM_CAP_COALESCED_PIO ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_IRQ_INJECT_STATUS ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IRQFD_RESAMPLE ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IOEVENTFD_ANY_LENGTH ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_SYNC_REGS ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_SET_GUEST_DEBUG ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_EXIT_ON_EMULATION_FAILURE ...

#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_SYNC_X86_REGS ...
#define KVM_SYNC_X86_SREGS ...
#define KVM_SYNC_X86_EVENTS ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_GUESTDBG_USE_HW_BP ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...
#define KVM_VCPUEVENT_VALID_NMI_PENDING ...
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR ...
#define KVM_VCPUEVENT_VALID_SHADOW ...
#define KVM_VCPUEVENT_VALID_SMM ...

/* -- kernel structures -------------------------------------------------------------------- */
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
    ...;
};
struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    ...;
};
struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[...];
    ...;
};
struct kvm_fpu {
    __u8 fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8 ftwx;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8 xmm[16][16];
    __u32 mxcsr;
    ...;
};
struct kvm_msr_entry {
    __u32 index;
    __u64 data;
    ...;
};
struct kvm_msrs {
    __u32 nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};
struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
    ...;
};
struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    ...;
};
struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};
struct kvm_lapic_state {
    char regs[...];
    ...;
};
struct kvm_xcr {
    __u32 xcr;
    __u64 value;
    ...;
};
struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[...];
    ...;
};
struct kvm_xsave {
    __u32 region[1024];
    ...;
};
struct kvm_irqchip {
    __u32 chip_id;
    __u32 pad;
    ...;
};
struct kvm_pit_state2 {
    __u32 flags;
    ...;
};
struct kvm_mp_state {
    __u32 mp_state;
    ...;
};
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    struct { __u8 pending; } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};
struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
    ...;
};
struct kvm_dirty_log {
    __u32 slot;
    __u32 padding1;
    union { void *dirty_bitmap; __u64 padding2; };
};
struct kvm_irq_level {
    union { __u32 irq; __s32 status; };
    __u32 level;
};
struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    __u32 resamplefd;
    ...;
};
struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    ...;
};
struct kvm_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    __u32 flags;
    __u32 devid;
    ...;
};
struct kvm_irq_routing_irqchip {
    __u32 irqchip;
    __u32 pin;
};
struct kvm_irq_routing_msi {
    __u32 address_lo;
    __u32 address_hi;
    __u32 data;
    union { __u32 pad; __u32 devid; };
};
struct kvm_irq_routing_entry {
    __u32 gsi;
    __u32 type;
    __u32 flags;
    __u32 pad;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        __u64 pad64[4];
    } u;
};
struct kvm_irq_routing {
    __u32 nr;
    __u32 flags;
    struct kvm_irq_routing_entry entries[];
    ...;
};
struct kvm_coalesced_mmio_zone {
    __u64 addr;
    __u32 size;
    union { __u32 pad; __u32 pio; };
};
struct kvm_pit_config {
    __u32 flags;
    ...;
};
struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    __u64 realtime;
    __u64 host_tsc;
    ...;
};
struct kvm_guest_debug_arch {
    __u64 debugreg[8];
};
struct kvm_guest_debug {
    __u32 control;
    struct kvm_guest_debug_arch arch;
    ...;
};
struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    ...;
};

/* -- sync regs (kvm_run->s.regs: x86's struct kvm_sync_regs) ------------------------------ */
struct kvm_regs *vmk_vcpu_sync_regs(struct vmk_vcpu *v);
struct kvm_sregs *vmk_vcpu_sync_sregs(struct vmk_vcpu *v);
"""


def header_cdef(header: Path) -> str:
    """``header``'s declarations as cffi's ``cdef`` takes them, so that they are written once,
    in the header: comments and preprocessor lines dropped (``#if``/``#ifdef`` blocks with
    their contents, the include guard kept open), each object-like ``#define NAME value`` as
    ``#define NAME ...`` and each array size that is not a literal as ``[...]`` (the compiler
    fills both in, and cffi checks the rest of every struct against it).

    The same function is in ``vmmkit_devices/virtio/_native_build.py``: a build script runs
    with only setuptools and cffi installed, so the two cannot share a module."""
    text = re.sub(r"/\*.*?\*/", " ", header.read_text(), flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out: list[str] = []
    depth = 0  # inside #if/#ifdef/#ifndef blocks other than the include guard
    guard = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if depth == 0:
                out.append(re.sub(r"\[([^\]\d][^\]]*)\]", "[...]", line))
            continue
        directive, _, rest = stripped[1:].strip().partition(" ")
        rest = rest.strip()
        if directive == "ifndef" and guard is None and not any(o.strip() for o in out):
            guard = rest
        elif directive in ("if", "ifdef", "ifndef"):
            depth += 1
        elif directive == "endif":
            depth = max(depth - 1, 0)
        elif directive == "define" and depth == 0:
            name, _, value = rest.partition(" ")
            if name != guard and "(" not in name and value.strip():
                out.append(f"#define {name} ...")
    return "\n".join(out)


def runloop_cdef() -> str:
    """``runloop.h``'s declarations (its ``#ifdef __x86_64__`` part is in :data:`X86_CDEF`), with
    the Python callback declared as cffi's ``extern "Python+C"``."""
    declarations = header_cdef(HERE / "runloop.h")
    callback = "int vmk_py_io("
    if declarations.count(callback) != 1:
        raise RuntimeError(f"runloop.h must declare {callback}...) once")
    return declarations.replace(callback, 'extern "Python+C" ' + callback)


ARM64_CDEF = r"""
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_ARM_NISV ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_FAIL_ENTRY ...
"""

#: The architecture's part of the declarations, by ``platform.machine()`` name.
ARCH_CDEF = {"x86_64": X86_CDEF, "aarch64": ARM64_CDEF}


def host_arch() -> str:
    machine = platform.machine()
    return "aarch64" if machine == "arm64" else machine


def builder_for(arch: str) -> FFI:
    """The cffi builder of ``vmmkit_kvm._native`` for ``arch`` (compiled with that
    architecture's ``<linux/kvm.h>``: the host's, or a cross sysroot's)."""
    if arch not in ARCH_CDEF:
        raise ValueError(f"vmmkit_kvm._native has no declarations for {arch!r} (known: {', '.join(ARCH_CDEF)})")
    builder = FFI()
    builder.cdef(COMMON_CDEF + runloop_cdef() + ARCH_CDEF[arch])
    builder.set_source(
        "vmmkit_kvm._native",
        '#include <sys/ioctl.h>\n#include <linux/kvm.h>\n#include "runloop.h"',
        # cffi wants the path relative to the directory setup.py runs in.
        sources=[os.path.relpath(HERE / "runloop.c")],
        include_dirs=[str(HERE)],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return builder


#: The host's (what ``setup.py`` builds).
ffibuilder = builder_for(host_arch())

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
