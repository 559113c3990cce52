"""The kernel's side of the ABI, written again, independently of the backend's cffi bindings:
ioctl numbers from the ``_IOC`` formula of include/uapi/asm-generic/ioctl.h, structs as
:mod:`struct` formats from the upstream headers (packed, little-endian). A layout the backend
got wrong therefore fails here instead of agreeing with itself."""

from __future__ import annotations

import ctypes
import struct

_IOC_WRITE = 1
_IOC_READ = 2
MSHV_IOCTL = 0xB8


def _ioc(direction: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: dir in bits 30-31, size 16-29, type 8-15, nr 0-7."""
    return (direction << 30) | (size << 16) | (MSHV_IOCTL << 8) | nr


# struct formats (include/uapi/linux/mshv.h)
CREATE_PARTITION = struct.Struct("<QQ")  # pt_flags, pt_isolation
CREATE_VP = struct.Struct("<I")  # vp_index
USER_MEM_REGION = struct.Struct("<QQQB7s")  # size, guest_pfn, userspace_addr, flags, rsvd
USER_IRQFD = struct.Struct("<iiII")  # fd, resamplefd, gsi, flags
USER_IOEVENTFD = struct.Struct("<QQIiI4s")  # datamatch, addr, len, fd, flags, rsvd
USER_IRQ_TABLE = struct.Struct("<II")  # nr, rsvd; then entries
USER_IRQ_ENTRY = struct.Struct("<IIII")  # gsi, address_lo, address_hi, data
GPAP_ACCESS_BITMAP = struct.Struct("<BB6sQQQ")  # access_type, access_op, rsvd, page_count, gpap_base, bitmap_ptr
ROOT_HVCALL = struct.Struct("<HHHHH6sQQ")  # code, reps, in_sz, out_sz, status, rsvd, in_ptr, out_ptr
GET_SET_VP_STATE = struct.Struct("<B3sIQ")  # type, rsvd, buf_sz, buf_ptr
RUN_VP_SIZE = 256

MSHV_CREATE_PARTITION = _ioc(_IOC_WRITE, 0x00, CREATE_PARTITION.size)
MSHV_INITIALIZE_PARTITION = _ioc(0, 0x00, 0)
MSHV_CREATE_VP = _ioc(_IOC_WRITE, 0x01, CREATE_VP.size)
MSHV_SET_GUEST_MEMORY = _ioc(_IOC_WRITE, 0x02, USER_MEM_REGION.size)
MSHV_IRQFD = _ioc(_IOC_WRITE, 0x03, USER_IRQFD.size)
MSHV_IOEVENTFD = _ioc(_IOC_WRITE, 0x04, USER_IOEVENTFD.size)
MSHV_SET_MSI_ROUTING = _ioc(_IOC_WRITE, 0x05, USER_IRQ_TABLE.size)
MSHV_GET_GPAP_ACCESS_BITMAP = _ioc(_IOC_READ | _IOC_WRITE, 0x06, GPAP_ACCESS_BITMAP.size)
MSHV_ROOT_HVCALL = _ioc(_IOC_READ | _IOC_WRITE, 0x07, ROOT_HVCALL.size)
MSHV_RUN_VP = _ioc(_IOC_READ, 0x00, RUN_VP_SIZE)
MSHV_GET_VP_STATE = _ioc(_IOC_READ | _IOC_WRITE, 0x01, GET_SET_VP_STATE.size)
MSHV_SET_VP_STATE = _ioc(_IOC_READ | _IOC_WRITE, 0x02, GET_SET_VP_STATE.size)

# hypervisor structures (include/hyperv/hvgdk_mini.h, hvhdk.h)
MESSAGE_HEADER = struct.Struct("<IBB2sQ")  # message_type, payload_size, flags, reserved, sender
MESSAGE_SIZE = 256
SEGMENT = struct.Struct("<QIHH")  # base, limit, selector, attributes
TABLE = struct.Struct("<6xHQ")  # pad[3], limit, base
#: hv_x64_intercept_message_header: vp_index, instruction_length:4|cr8:4, access_type,
#: execution_state, cs_segment (16), rip, rflags
INTERCEPT_HEADER = struct.Struct("<IBBH16sQQ")
#: after the header: port_number, access_info, instruction_byte_count, reserved, rax,
#: instruction_bytes[16], ds_segment, es_segment, rcx, rsi, rdi
IO_PORT_BODY = struct.Struct("<HBBIQ16s16s16sQQQ")
#: cache_type, instruction_byte_count, memory_access_info, tpr_priority, reserved1, gva, gpa, bytes
MEMORY_BODY = struct.Struct("<IBBBBQQ16s")
CPUID_BODY = struct.Struct("<8Q")  # rax rcx rdx rbx, default_result_rax rcx rdx rbx
MSR_BODY = struct.Struct("<IIQQ")  # msr_number, reserved, rdx, rax
#: exception_vector, exception_info, instruction_byte_count, error_code, exception_parameter,
#: reserved, instruction_bytes[16], ds_segment, ss_segment, then 16 GPRs
EXCEPTION_BODY = struct.Struct("<HBBIQQ16s16s16s16Q")
REGISTER_ASSOC = struct.Struct("<IIQ16s")  # name, reserved1, reserved2, value
VP_REGISTERS_HEADER = struct.Struct("<QIBBH")  # partition_id, vp_index, input_vtl, rsvd_z8, rsvd_z16
INSTALL_INTERCEPT = struct.Struct("<QIIQ")  # partition_id, access_type, intercept_type, parameter
GET_PARTITION_PROPERTY = struct.Struct("<QII")  # partition_id, property_code, padding
SET_PARTITION_PROPERTY = struct.Struct("<QIIQ")  # ... property_value
ASSERT_VIRTUAL_INTERRUPT = struct.Struct("<QQQIBBH")  # partition_id, control, dest_addr, vector, vtl, rsvd
#: hv_vp_register_page up to instruction_emulation_hints: version, isvalid, rsvdz, dirty,
#: 16 GPRs, rip, rflags, xmm[6] (96 bytes), segments[6] (96 bytes), cr0 cr3 cr4 cr8 efer dr7,
#: pending_interruption, interrupt_state, instruction_emulation_hints
REGISTER_PAGE = struct.Struct("<HBBI16QQQ96s96s9Q")
REGISTER_PAGE_GPRS = 8
REGISTER_PAGE_RIP = 8 + 16 * 8
REGISTER_PAGE_RFLAGS = REGISTER_PAGE_RIP + 8
LAPIC_STATE = struct.Struct("<44I")  # hv_local_interrupt_controller_state

HV_STATUS_SUCCESS = 0x0
HV_STATUS_INVALID_HYPERCALL_CODE = 0x2
HV_STATUS_INVALID_HYPERCALL_INPUT = 0x3
HV_STATUS_INVALID_PARAMETER = 0x5
HV_STATUS_UNKNOWN_PROPERTY = 0x9
HV_STATUS_INVALID_VP_INDEX = 0xE
HV_STATUS_INVALID_REGISTER_VALUE = 0x50

HVCALL_GET_PARTITION_PROPERTY = 0x0044
HVCALL_SET_PARTITION_PROPERTY = 0x0045
HVCALL_INSTALL_INTERCEPT = 0x004D
HVCALL_GET_VP_REGISTERS = 0x0050
HVCALL_SET_VP_REGISTERS = 0x0051
HVCALL_TRANSLATE_VIRTUAL_ADDRESS = 0x0052
HVCALL_CLEAR_VIRTUAL_INTERRUPT = 0x0056
HVCALL_REGISTER_INTERCEPT_RESULT = 0x0091
HVCALL_ASSERT_VIRTUAL_INTERRUPT = 0x0094
HVCALL_GET_GPA_PAGES_ACCESS_STATES = 0x00C9
HVCALL_SIGNAL_EVENT_DIRECT = 0x00C0
HVCALL_POST_MESSAGE_DIRECT = 0x00C1
HVCALL_GET_VP_CPUID_VALUES = 0x00F4
#: mshv_passthru_hvcalls[] in drivers/hv/mshv_root_main.c: the hypercalls MSHV_ROOT_HVCALL allows.
PASSTHRU_HVCALLS = frozenset({
    HVCALL_GET_PARTITION_PROPERTY, HVCALL_SET_PARTITION_PROPERTY, HVCALL_INSTALL_INTERCEPT,
    HVCALL_GET_VP_REGISTERS, HVCALL_SET_VP_REGISTERS, HVCALL_TRANSLATE_VIRTUAL_ADDRESS,
    HVCALL_CLEAR_VIRTUAL_INTERRUPT, HVCALL_REGISTER_INTERCEPT_RESULT, HVCALL_ASSERT_VIRTUAL_INTERRUPT,
    HVCALL_GET_GPA_PAGES_ACCESS_STATES, HVCALL_SIGNAL_EVENT_DIRECT, HVCALL_POST_MESSAGE_DIRECT,
    HVCALL_GET_VP_CPUID_VALUES,
})

HVMSG_UNMAPPED_GPA = 0x80000000
HVMSG_GPA_INTERCEPT = 0x80000001
HVMSG_UNRECOVERABLE_EXCEPTION = 0x80000021
HVMSG_X64_IO_PORT_INTERCEPT = 0x80010000
HVMSG_X64_MSR_INTERCEPT = 0x80010001
HVMSG_X64_CPUID_INTERCEPT = 0x80010002
HVMSG_X64_EXCEPTION_INTERCEPT = 0x80010003
HVMSG_X64_APIC_EOI = 0x80010004
HVMSG_X64_HALT = 0x80010007

HV_INTERCEPT_ACCESS_READ = 0
HV_INTERCEPT_ACCESS_WRITE = 1
HV_INTERCEPT_ACCESS_EXECUTE = 2
HV_INTERCEPT_TYPE_X64_CPUID = 2


def read(addr: int, size: int) -> bytes:
    """Copy ``size`` bytes from the caller's memory (copy_from_user)."""
    return ctypes.string_at(addr, size)


def write(addr: int, data: bytes) -> None:
    """Copy ``data`` into the caller's memory (copy_to_user)."""
    ctypes.memmove(addr, data, len(data))


def hv_status_errno(status: int) -> int:
    """``hv_result_to_errno`` (drivers/hv/hv_common.c): the invalid-* statuses are EINVAL,
    insufficient memory ENOMEM, the rest EIO."""
    import errno

    if status in (HV_STATUS_INVALID_HYPERCALL_CODE, HV_STATUS_INVALID_HYPERCALL_INPUT, HV_STATUS_INVALID_PARAMETER,
                  0xD, HV_STATUS_INVALID_VP_INDEX, 0x11, 0x12, 0x41, HV_STATUS_INVALID_REGISTER_VALUE):
        return errno.EINVAL
    if status == 0xB:
        return errno.ENOMEM
    return errno.EIO
