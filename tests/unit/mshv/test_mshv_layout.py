"""The /dev/mshv ABI pinned to the upstream headers.

Every number below is read off the upstream definitions (the structs are ``__packed`` or
naturally aligned, so offsets are the running sums of the member sizes):

* include/uapi/linux/mshv.h (torvalds/linux): the ioctls and their argument structs;
* include/hyperv/hvgdk_mini.h: ``hv_message_header``/``hv_message`` (HV_MESSAGE_SIZE 256),
  ``hv_x64_segment_register``, ``hv_x64_table_register``, ``hv_register_assoc``,
  ``hv_input_{get,set}_vp_registers``, ``hv_input_install_intercept``;
* include/hyperv/hvhdk.h: ``hv_vp_register_page``, ``hv_input_{get,set}_partition_property``,
  ``hv_input_assert_virtual_interrupt``; the x64 intercept messages and
  ``hv_local_interrupt_controller_state`` as in rust-vmm/mshv's hv-headers/hvhdk.h.

Both sides are checked: the backend's cffi layouts (compiled from ``mshv_abi.h``) and the
simulated kernel's ``struct`` formats, written separately. A drifting layout fails here.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vmmkit_mshv._native")

from vmmkit_mshv import bindings  # noqa: E402
from vmmkit_mshv.simulator import abi  # noqa: E402

# (struct, sizeof, {member: offsetof}) from the upstream headers.
UPSTREAM = [
    ("struct mshv_create_partition", 16, {"pt_flags": 0, "pt_isolation": 8}),
    ("struct mshv_create_vp", 4, {"vp_index": 0}),
    ("struct mshv_user_mem_region", 32, {"size": 0, "guest_pfn": 8, "userspace_addr": 16, "flags": 24, "rsvd": 25}),
    ("struct mshv_user_irqfd", 16, {"fd": 0, "resamplefd": 4, "gsi": 8, "flags": 12}),
    ("struct mshv_user_ioeventfd", 32, {"datamatch": 0, "addr": 8, "len": 16, "fd": 20, "flags": 24, "rsvd": 28}),
    ("struct mshv_user_irq_entry", 16, {"gsi": 0, "address_lo": 4, "address_hi": 8, "data": 12}),
    ("struct mshv_user_irq_table", 8, {"nr": 0, "rsvd": 4}),
    ("struct mshv_gpap_access_bitmap", 32,
     {"access_type": 0, "access_op": 1, "rsvd": 2, "page_count": 8, "gpap_base": 16, "bitmap_ptr": 24}),
    ("struct mshv_root_hvcall", 32,
     {"code": 0, "reps": 2, "in_sz": 4, "out_sz": 6, "status": 8, "rsvd": 10, "in_ptr": 16, "out_ptr": 24}),
    ("struct mshv_run_vp", 256, {"msg_buf": 0}),
    ("struct mshv_get_set_vp_state", 16, {"type": 0, "rsvd": 1, "buf_sz": 4, "buf_ptr": 8}),
    ("struct hv_message_header", 16,
     {"message_type": 0, "payload_size": 4, "message_flags": 5, "reserved": 6, "sender": 8}),
    ("struct hv_message", 256, {"header": 0, "payload": 16}),
    ("struct hv_x64_segment_register", 16, {"base": 0, "limit": 8, "selector": 12, "attributes": 14}),
    ("struct hv_x64_table_register", 16, {"pad": 0, "limit": 6, "base": 8}),
    ("struct hv_register_assoc", 32, {"name": 0, "reserved1": 4, "reserved2": 8, "value": 16}),
    ("struct hv_input_get_vp_registers", 16,
     {"partition_id": 0, "vp_index": 8, "input_vtl": 12, "rsvd_z8": 13, "rsvd_z16": 14}),
    ("struct hv_input_set_vp_registers", 16,
     {"partition_id": 0, "vp_index": 8, "input_vtl": 12, "rsvd_z8": 13, "rsvd_z16": 14}),
    ("struct hv_input_install_intercept", 24,
     {"partition_id": 0, "access_type": 8, "intercept_type": 12, "intercept_parameter": 16}),
    ("struct hv_input_get_partition_property", 16, {"partition_id": 0, "property_code": 8, "padding": 12}),
    ("struct hv_input_set_partition_property", 24,
     {"partition_id": 0, "property_code": 8, "padding": 12, "property_value": 16}),
    ("struct hv_input_assert_virtual_interrupt", 32,
     {"partition_id": 0, "control": 8, "dest_addr": 16, "vector": 24, "target_vtl": 28, "rsvd_z0": 29,
      "rsvd_z1": 30}),
    ("struct hv_vp_register_page", 416,
     {"version": 0, "isvalid": 2, "rsvdz": 3, "dirty": 4, "gp_registers": 8, "rip": 136, "rflags": 144,
      "xmm_registers": 152, "segment_registers": 248, "cr0": 344, "cr3": 352, "cr4": 360, "cr8": 368,
      "efer": 376, "dr7": 384, "pending_interruption": 392, "interrupt_state": 400,
      "instruction_emulation_hints": 408}),
    ("struct hv_x64_intercept_message_header", 40,
     {"vp_index": 0, "instruction_length_cr8": 4, "intercept_access_type": 5, "execution_state": 6,
      "cs_segment": 8, "rip": 24, "rflags": 32}),
    ("struct hv_x64_io_port_intercept_message", 128,
     {"header": 0, "port_number": 40, "access_info": 42, "instruction_byte_count": 43, "reserved": 44, "rax": 48,
      "instruction_bytes": 56, "ds_segment": 72, "es_segment": 88, "rcx": 104, "rsi": 112, "rdi": 120}),
    ("struct hv_x64_memory_intercept_message", 80,
     {"header": 0, "cache_type": 40, "instruction_byte_count": 44, "memory_access_info": 45, "tpr_priority": 46,
      "reserved1": 47, "guest_virtual_address": 48, "guest_physical_address": 56, "instruction_bytes": 64}),
    ("struct hv_x64_cpuid_intercept_message", 104,
     {"header": 0, "rax": 40, "rcx": 48, "rdx": 56, "rbx": 64, "default_result_rax": 72,
      "default_result_rcx": 80, "default_result_rdx": 88, "default_result_rbx": 96}),
    ("struct hv_x64_msr_intercept_message", 64, {"header": 0, "msr_number": 40, "reserved": 44, "rdx": 48, "rax": 56}),
    ("struct hv_x64_exception_intercept_message", 240,
     {"header": 0, "exception_vector": 40, "exception_info": 42, "instruction_byte_count": 43, "error_code": 44,
      "exception_parameter": 48, "reserved": 56, "instruction_bytes": 64, "ds_segment": 80, "ss_segment": 96,
      "gprs": 112}),
    ("struct hv_x64_halt_message", 40, {"header": 0}),
    ("struct hv_x64_apic_eoi_message", 8, {"vp_index": 0, "interrupt_vector": 4}),
    ("struct hv_local_interrupt_controller_state", 176,
     {"apic_id": 0, "apic_version": 4, "apic_ldr": 8, "apic_dfr": 12, "apic_spurious": 16, "apic_isr": 20,
      "apic_tmr": 52, "apic_irr": 84, "apic_esr": 116, "apic_icr_high": 120, "apic_icr_low": 124,
      "apic_lvt_timer": 128, "apic_lvt_cmci": 152, "apic_error_status": 156, "apic_initial_count": 160,
      "apic_counter_value": 164, "apic_divide_configuration": 168, "apic_remote_read": 172}),
]

#: _IOW/_IOWR/_IOR/_IO(MSHV_IOCTL=0xB8, nr, struct) from include/uapi/linux/mshv.h, computed by
#: hand: direction << 30 | sizeof << 16 | 0xB8 << 8 | nr (write 1, read 2).
UPSTREAM_IOCTLS = {
    "MSHV_CREATE_PARTITION": 0x4010B800,  # _IOW(0xB8, 0x00, 16 bytes)
    "MSHV_INITIALIZE_PARTITION": 0x0000B800,  # _IO(0xB8, 0x00)
    "MSHV_CREATE_VP": 0x4004B801,  # _IOW(0xB8, 0x01, 4)
    "MSHV_SET_GUEST_MEMORY": 0x4020B802,  # _IOW(0xB8, 0x02, 32)
    "MSHV_IRQFD": 0x4010B803,  # _IOW(0xB8, 0x03, 16)
    "MSHV_IOEVENTFD": 0x4020B804,  # _IOW(0xB8, 0x04, 32)
    "MSHV_SET_MSI_ROUTING": 0x4008B805,  # _IOW(0xB8, 0x05, 8)
    "MSHV_GET_GPAP_ACCESS_BITMAP": 0xC020B806,  # _IOWR(0xB8, 0x06, 32)
    "MSHV_ROOT_HVCALL": 0xC020B807,  # _IOWR(0xB8, 0x07, 32)
    "MSHV_RUN_VP": 0x8100B800,  # _IOR(0xB8, 0x00, 256)
    "MSHV_GET_VP_STATE": 0xC010B801,  # _IOWR(0xB8, 0x01, 16)
    "MSHV_SET_VP_STATE": 0xC010B802,  # _IOWR(0xB8, 0x02, 16)
}


@pytest.mark.parametrize("struct,size,offsets", UPSTREAM, ids=[s for s, _, _ in UPSTREAM])
def test_backend_struct_layout_matches_the_upstream_headers(struct: str, size: int, offsets: dict[str, int]) -> None:
    compiled_size, compiled = bindings.layout(struct)
    assert compiled_size == size, f"sizeof({struct}) is {compiled_size}, upstream {size}"
    for member, offset in offsets.items():
        assert compiled[member] == offset, f"offsetof({struct}, {member}) is {compiled[member]}, upstream {offset}"


def test_backend_ioctl_numbers_match_the_upstream_definitions() -> None:
    assert bindings.ioctl_numbers() == UPSTREAM_IOCTLS


def test_simulated_kernel_ioctl_numbers_match_the_upstream_definitions() -> None:
    assert {name: getattr(abi, name) for name in UPSTREAM_IOCTLS} == UPSTREAM_IOCTLS


@pytest.mark.parametrize(
    "fmt,size",
    [
        (abi.CREATE_PARTITION, 16), (abi.CREATE_VP, 4), (abi.USER_MEM_REGION, 32), (abi.USER_IRQFD, 16),
        (abi.USER_IOEVENTFD, 32), (abi.USER_IRQ_TABLE, 8), (abi.USER_IRQ_ENTRY, 16), (abi.GPAP_ACCESS_BITMAP, 32),
        (abi.ROOT_HVCALL, 32), (abi.GET_SET_VP_STATE, 16), (abi.MESSAGE_HEADER, 16), (abi.SEGMENT, 16),
        (abi.TABLE, 16), (abi.REGISTER_ASSOC, 32), (abi.VP_REGISTERS_HEADER, 16), (abi.INSTALL_INTERCEPT, 24),
        (abi.SET_PARTITION_PROPERTY, 24), (abi.ASSERT_VIRTUAL_INTERRUPT, 32), (abi.REGISTER_PAGE, 416),
        (abi.INTERCEPT_HEADER, 40), (abi.LAPIC_STATE, 176),
    ],
)
def test_simulated_kernel_struct_sizes_match_the_upstream_headers(fmt: object, size: int) -> None:
    assert fmt.size == size  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body,message_size",
    [(abi.IO_PORT_BODY, 128), (abi.MEMORY_BODY, 80), (abi.CPUID_BODY, 104), (abi.MSR_BODY, 64),
     (abi.EXCEPTION_BODY, 240)],
)
def test_simulated_intercept_messages_match_the_upstream_sizes(body: object, message_size: int) -> None:
    assert abi.INTERCEPT_HEADER.size + body.size == message_size  # type: ignore[attr-defined]


def test_a_hv_message_fits_the_run_vp_buffer() -> None:
    """static_assert(sizeof(struct hv_message) <= MSHV_RUN_VP_BUF_SZ) in mshv_root_main.c."""
    assert bindings.layout("struct hv_message")[0] <= bindings.layout("struct mshv_run_vp")[0] == 256
