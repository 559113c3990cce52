"""The KVM-arm64 code path cannot run on this x86-64 host: check its ABI constants against
the values in Linux's UAPI headers (arch/arm64/include/uapi/asm/kvm.h, include/uapi/linux/kvm.h)."""

from __future__ import annotations

from vmmkit_kvm import arm64 as K

from vmmkit.aarch64 import SysReg


def test_ioctl_numbers_match_linux() -> None:
    assert K.KVM_RUN == 0xAE80
    assert K.KVM_CREATE_VCPU == 0xAE41
    assert K.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert K.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert K.KVM_ARM_PREFERRED_TARGET == 0x8020AEAF
    assert K.KVM_GET_ONE_REG == 0x4010AEAB
    assert K.KVM_SET_ONE_REG == 0x4010AEAC
    assert K.KVM_CREATE_DEVICE == 0xC00CAEE0
    assert K.KVM_SET_DEVICE_ATTR == 0x4018AEE1
    assert K.KVM_IRQ_LINE == 0x4008AE61
    assert K.KVM_GET_MP_STATE == 0x8004AE98


def test_core_register_ids() -> None:
    # KVM_REG_ARM_CORE_REG(regs.regs[0]) / (regs.pc) / (regs.pstate) / (sp_el1)
    assert K.REG_X[0] == 0x6030_0000_0010_0000
    assert K.REG_X[30] == 0x6030_0000_0010_003C
    assert K.REG_PC == 0x6030_0000_0010_0040
    assert K.REG_PSTATE == 0x6030_0000_0010_0042
    assert K.REG_SP_EL1 == 0x6030_0000_0010_0044


def test_sysreg_ids() -> None:
    # ARM64_SYS_REG(3, 0, 0, 0, 5) = MPIDR_EL1
    assert K.sys_reg_id(SysReg.MPIDR_EL1) == 0x6030_0000_0013_C005
    assert K.sys_reg_id(SysReg.SCTLR_EL1) == 0x6030_0000_0013_C080


def test_secondaries_start_powered_off_with_psci_in_the_kernel() -> None:
    assert K.vcpu_features(0) == (K.KVM_ARM_VCPU_PSCI_0_2,)
    assert K.KVM_ARM_VCPU_POWER_OFF in K.vcpu_features(1)
    assert K.KvmArm64Vm.firmware_in_hypervisor


def test_not_usable_on_this_host_says_why() -> None:
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        return
    availability = K.KvmArm64Hypervisor.is_available()
    assert not availability and "arm64 host" in availability.reason
