"""XSAVE on a real KVM with vmmkit's CPUID table: the guest's XSETBV reaches KVM, which then
answers CPUID 0xD.0 EBX with the size vmmkit's leaf 0xD describes, and refuses a component
vmmkit does not offer. And guest debugging by single-step (the hardware-breakpoint test is in
test_kvm_exits.py).

Hosts without XSAVE skip the XSAVE tests: the kvm_pvm CI host offers none, and the x86-64 lab
hides it on QEMU < 8.2, whose emulated SVM lets a nested guest's XSETBV bypass KVM
(lab/README.md). Measured there with XSAVE left on: after ``xsetbv`` with 0x7 and one CPUID
exit, ``xgetbv`` read 0x1, KVM_GET_XCRS said 0x1 and 0xD.0 EBX was 576 - the first test fails.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from vmmkit_x86_64.cpuid import build_cpuid, parse_features, xsave_area_size
from vmmkit_x86_64.topology import Topology

from vmmkit.hypervisor import ExitReason
from vmmkit.x86 import CpuIdEntry, CpuIdTable

pytestmark = pytest.mark.requires_kvm

PORT = 0x80
XSAVE = 1 << 26  #: leaf 1 ECX
CR4_OSXSAVE_BIT = 18


def vmmkit_cpuid(kvm: Any, *features: str) -> list[CpuIdEntry]:
    supported = kvm.supported_cpuid()
    leaf1 = CpuIdTable(supported).get(1)
    if leaf1 is None or not leaf1.ecx & XSAVE:
        pytest.skip("this KVM offers no XSAVE (kvm_pvm; or the x86 lab on QEMU < 8.2, lab/README.md)")
    return build_cpuid(supported, index=0, topology=Topology(), features=parse_features(features))


def xsetbv_program(xcr0: int) -> str:
    """Enable OSXSAVE, XSETBV ``xcr0``, then report CPUID 0xD.0 EBX and XGETBV on :data:`PORT`.
    The CPUID is a VM exit, so the XGETBV after it shows what KVM left in XCR0."""
    return (
        f"mov %cr4, %rax\n bts ${CR4_OSXSAVE_BIT}, %rax\n mov %rax, %cr4\n"
        f" mov ${xcr0 & 0xFFFFFFFF}, %eax\n mov ${xcr0 >> 32}, %edx\n xor %ecx, %ecx\n xsetbv\n"
        f" mov $0xd, %eax\n xor %ecx, %ecx\n cpuid\n mov %ebx, %eax\n out %eax, ${PORT}\n"
        f" xor %ecx, %ecx\n xgetbv\n out %eax, ${PORT}\n hlt"
    )


def test_guest_xcr0_reaches_kvm_and_sizes_match_vmmkit_leaf(kvm, make_guest) -> None:
    entries = vmmkit_cpuid(kvm)
    main = CpuIdTable(entries).get(0xD, 0)
    assert main is not None
    xcr0 = main.eax | main.edx << 32
    guest = make_guest(xsetbv_program(xcr0))
    guest.vcpu.set_cpuid(entries)
    assert guest.run().reason is ExitReason.HLT
    reported = [int.from_bytes(data, "little") for port, data in guest.ops.of("pio_write") if port == PORT]
    size = xsave_area_size(entries, xcr0)
    assert reported == [size, xcr0 & 0xFFFFFFFF], f"CPUID 0xD.0 EBX, XGETBV after XSETBV {xcr0:#x}"
    assert guest.vcpu.get_xcrs()[0] == xcr0
    assert main.ecx == size  # vmmkit's static ECX: the size for everything it offers


def test_a_component_vmmkit_does_not_offer_is_refused(kvm, make_guest) -> None:
    """Without AVX in vmmkit's table, XCR0 bit 2 is not in 0xD.0 EAX, and KVM (which takes the
    guest's allowed XCR0 from it) answers XSETBV 0x7 with #GP: a triple fault without an IDT."""
    entries = vmmkit_cpuid(kvm, "-avx")
    assert CpuIdTable(kvm.supported_cpuid()).get(0xD, 0).eax & 0x4, "KVM supports YMM"  # type: ignore[union-attr]
    assert CpuIdTable(entries).get(0xD, 0).eax & 0x4 == 0  # type: ignore[union-attr]
    guest = make_guest(xsetbv_program(0x7))
    guest.vcpu.set_cpuid(entries)
    sregs = guest.vcpu.get_sregs()
    guest.vcpu.set_sregs(attrs.evolve(sregs, idt=attrs.evolve(sregs.idt, limit=0)))
    assert guest.run().reason is ExitReason.SHUTDOWN
    assert guest.ops.of("pio_write") == []


def test_single_step_is_a_debug_exit_per_instruction(make_guest) -> None:
    guest = make_guest("nop\n second: nop\n third: mov $1, %eax\n hlt")
    guest.vcpu.set_guest_debug(single_step=True)
    for label in ("second", "third"):
        exit_ = guest.run()
        assert exit_.reason is ExitReason.DEBUG, exit_
        assert guest.vcpu.get_regs().rip == guest.symbols[label]
    guest.vcpu.set_guest_debug(enable=False)
    assert guest.run().reason is ExitReason.HLT
