/*
 * The /dev/mshv user ABI and the Microsoft Hypervisor structures vmmkit uses, written from the
 * upstream definitions (Debian 12's linux-libc-dev has no <linux/mshv.h>):
 *
 *   include/uapi/linux/mshv.h      ioctls and their argument structs
 *   include/hyperv/hvgdk_mini.h    hv_message, register names and values, hypercall codes,
 *                                  hv_input_{get,set}_vp_registers, hv_input_install_intercept
 *   include/hyperv/hvhdk.h         the intercept messages, hv_vp_register_page, partition
 *                                  properties, hv_input_assert_virtual_interrupt,
 *                                  hv_local_interrupt_controller_state
 *   (torvalds/linux; the intercept messages and the LAPIC state as in rust-vmm/mshv's
 *   hv-headers, which the kernel headers do not carry)
 *
 * Member names of anonymous unions are given names here; layouts are what matters, and
 * tests/unit/mshv/test_layout.py pins every size and offset to the numbers of those headers.
 */
#ifndef VMMKIT_MSHV_ABI_H
#define VMMKIT_MSHV_ABI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define VMK_PACKED __attribute__((packed))

/* ---- include/uapi/linux/mshv.h ---------------------------------------------------------- */

#define MSHV_IOCTL 0xB8

#define MSHV_PT_BIT_LAPIC 0
#define MSHV_PT_BIT_X2APIC 1
#define MSHV_PT_BIT_GPA_SUPER_PAGES 2
#define MSHV_PT_BIT_COUNT 3
#define MSHV_PT_ISOLATION_NONE 0
#define MSHV_PT_ISOLATION_COUNT 1

struct mshv_create_partition {
	__u64 pt_flags;
	__u64 pt_isolation;
};

struct mshv_create_vp {
	__u32 vp_index;
};

#define MSHV_SET_MEM_BIT_WRITABLE 0
#define MSHV_SET_MEM_BIT_EXECUTABLE 1
#define MSHV_SET_MEM_BIT_UNMAP 2
#define MSHV_SET_MEM_BIT_COUNT 3
#define MSHV_HV_PAGE_SIZE 0x1000

struct mshv_user_mem_region {
	__u64 size;
	__u64 guest_pfn;
	__u64 userspace_addr;
	__u8 flags;
	__u8 rsvd[7];
};

#define MSHV_IRQFD_BIT_DEASSIGN 0
#define MSHV_IRQFD_BIT_RESAMPLE 1
#define MSHV_IRQFD_BIT_COUNT 2

struct mshv_user_irqfd {
	__s32 fd;
	__s32 resamplefd;
	__u32 gsi;
	__u32 flags;
};

#define MSHV_IOEVENTFD_BIT_DATAMATCH 0
#define MSHV_IOEVENTFD_BIT_PIO 1
#define MSHV_IOEVENTFD_BIT_DEASSIGN 2
#define MSHV_IOEVENTFD_BIT_COUNT 3

struct mshv_user_ioeventfd {
	__u64 datamatch;
	__u64 addr;
	__u32 len;
	__s32 fd;
	__u32 flags;
	__u8 rsvd[4];
};

struct mshv_user_irq_entry {
	__u32 gsi;
	__u32 address_lo;
	__u32 address_hi;
	__u32 data;
};

struct mshv_user_irq_table {
	__u32 nr;
	__u32 rsvd;
	struct mshv_user_irq_entry entries[];
};

#define MSHV_GPAP_ACCESS_TYPE_ACCESSED 0
#define MSHV_GPAP_ACCESS_TYPE_DIRTY 1
#define MSHV_GPAP_ACCESS_TYPE_COUNT 2
#define MSHV_GPAP_ACCESS_OP_NOOP 0
#define MSHV_GPAP_ACCESS_OP_CLEAR 1
#define MSHV_GPAP_ACCESS_OP_SET 2
#define MSHV_GPAP_ACCESS_OP_COUNT 3

struct mshv_gpap_access_bitmap {
	__u8 access_type;
	__u8 access_op;
	__u8 rsvd[6];
	__u64 page_count;
	__u64 gpap_base;
	__u64 bitmap_ptr;
};

struct mshv_root_hvcall {
	__u16 code;
	__u16 reps;
	__u16 in_sz;
	__u16 out_sz;
	__u16 status;
	__u8 rsvd[6];
	__u64 in_ptr;
	__u64 out_ptr;
};

#define MSHV_RUN_VP_BUF_SZ 256

#define MSHV_VP_MMAP_OFFSET_REGISTERS 0
#define MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE 1
#define MSHV_VP_MMAP_OFFSET_GHCB 2

struct mshv_run_vp {
	__u8 msg_buf[MSHV_RUN_VP_BUF_SZ];
};

#define MSHV_VP_STATE_LAPIC 0
#define MSHV_VP_STATE_XSAVE 1
#define MSHV_VP_STATE_SIMP 2
#define MSHV_VP_STATE_SIEFP 3
#define MSHV_VP_STATE_SYNTHETIC_TIMERS 4
#define MSHV_VP_STATE_COUNT 5

struct mshv_get_set_vp_state {
	__u8 type;
	__u8 rsvd[3];
	__u32 buf_sz;
	__u64 buf_ptr;
};

/* /dev/mshv */
#define MSHV_CREATE_PARTITION _IOW(MSHV_IOCTL, 0x00, struct mshv_create_partition)
/* partition fds */
#define MSHV_INITIALIZE_PARTITION _IO(MSHV_IOCTL, 0x00)
#define MSHV_CREATE_VP _IOW(MSHV_IOCTL, 0x01, struct mshv_create_vp)
#define MSHV_SET_GUEST_MEMORY _IOW(MSHV_IOCTL, 0x02, struct mshv_user_mem_region)
#define MSHV_IRQFD _IOW(MSHV_IOCTL, 0x03, struct mshv_user_irqfd)
#define MSHV_IOEVENTFD _IOW(MSHV_IOCTL, 0x04, struct mshv_user_ioeventfd)
#define MSHV_SET_MSI_ROUTING _IOW(MSHV_IOCTL, 0x05, struct mshv_user_irq_table)
#define MSHV_GET_GPAP_ACCESS_BITMAP _IOWR(MSHV_IOCTL, 0x06, struct mshv_gpap_access_bitmap)
#define MSHV_ROOT_HVCALL _IOWR(MSHV_IOCTL, 0x07, struct mshv_root_hvcall)
/* VP fds */
#define MSHV_RUN_VP _IOR(MSHV_IOCTL, 0x00, struct mshv_run_vp)
#define MSHV_GET_VP_STATE _IOWR(MSHV_IOCTL, 0x01, struct mshv_get_set_vp_state)
#define MSHV_SET_VP_STATE _IOWR(MSHV_IOCTL, 0x02, struct mshv_get_set_vp_state)

/* ---- include/hyperv/hvgdk_mini.h -------------------------------------------------------- */

#define HV_STATUS_SUCCESS 0x0
#define HV_STATUS_INVALID_HYPERCALL_CODE 0x2
#define HV_STATUS_INVALID_HYPERCALL_INPUT 0x3
#define HV_STATUS_INVALID_PARAMETER 0x5
#define HV_STATUS_ACCESS_DENIED 0x6
#define HV_STATUS_UNKNOWN_PROPERTY 0x9
#define HV_STATUS_INVALID_VP_INDEX 0xE
#define HV_STATUS_INVALID_REGISTER_VALUE 0x50

#define HVCALL_GET_PARTITION_PROPERTY 0x0044
#define HVCALL_SET_PARTITION_PROPERTY 0x0045
#define HVCALL_INSTALL_INTERCEPT 0x004d
#define HVCALL_GET_VP_REGISTERS 0x0050
#define HVCALL_SET_VP_REGISTERS 0x0051
#define HVCALL_ASSERT_VIRTUAL_INTERRUPT 0x0094

#define HVMSG_NONE 0x00000000
#define HVMSG_UNMAPPED_GPA 0x80000000
#define HVMSG_GPA_INTERCEPT 0x80000001
#define HVMSG_UNRECOVERABLE_EXCEPTION 0x80000021
#define HVMSG_X64_IO_PORT_INTERCEPT 0x80010000
#define HVMSG_X64_MSR_INTERCEPT 0x80010001
#define HVMSG_X64_CPUID_INTERCEPT 0x80010002
#define HVMSG_X64_EXCEPTION_INTERCEPT 0x80010003
#define HVMSG_X64_APIC_EOI 0x80010004
#define HVMSG_X64_HALT 0x80010007

#define HV_INTERCEPT_TYPE_X64_IO_PORT 0x00000000
#define HV_INTERCEPT_TYPE_X64_MSR 0x00000001
#define HV_INTERCEPT_TYPE_X64_CPUID 0x00000002
#define HV_INTERCEPT_TYPE_EXCEPTION 0x00000003
#define HV_INTERCEPT_ACCESS_MASK_READ 0x01
#define HV_INTERCEPT_ACCESS_MASK_WRITE 0x02
#define HV_INTERCEPT_ACCESS_MASK_EXECUTE 0x04
#define HV_INTERCEPT_ACCESS_READ 0
#define HV_INTERCEPT_ACCESS_WRITE 1
#define HV_INTERCEPT_ACCESS_EXECUTE 2

#define HV_X64_INTERRUPT_TYPE_FIXED 0x0000
#define HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY 0x0001
#define HV_X64_INTERRUPT_TYPE_NMI 0x0004
#define HV_X64_INTERRUPT_TYPE_INIT 0x0005
#define HV_X64_INTERRUPT_TYPE_SIPI 0x0006

struct hv_u128 {
	__u64 low_part;
	__u64 high_part;
} VMK_PACKED;

struct hv_message_header {
	__u32 message_type;
	__u8 payload_size;
	__u8 message_flags;
	__u8 reserved[2];
	__u64 sender;
} VMK_PACKED;

struct hv_message {
	struct hv_message_header header;
	__u64 payload[30];
} VMK_PACKED;

struct hv_x64_segment_register {
	__u64 base;
	__u32 limit;
	__u16 selector;
	__u16 attributes; /* type:4 s:1 dpl:2 p:1 rsvd:4 avl:1 l:1 db:1 g:1 */
} VMK_PACKED;

struct hv_x64_table_register {
	__u16 pad[3];
	__u16 limit;
	__u64 base;
} VMK_PACKED;

union hv_register_value {
	struct hv_u128 reg128;
	__u64 reg64;
	__u32 reg32;
	__u16 reg16;
	__u8 reg8;
	struct hv_x64_segment_register segment;
	struct hv_x64_table_register table;
};

struct hv_register_assoc {
	__u32 name;
	__u32 reserved1;
	__u64 reserved2;
	union hv_register_value value;
} VMK_PACKED;

struct hv_input_get_vp_registers {
	__u64 partition_id;
	__u32 vp_index;
	__u8 input_vtl;
	__u8 rsvd_z8;
	__u16 rsvd_z16;
	__u32 names[];
} VMK_PACKED;

struct hv_input_set_vp_registers {
	__u64 partition_id;
	__u32 vp_index;
	__u8 input_vtl;
	__u8 rsvd_z8;
	__u16 rsvd_z16;
	struct hv_register_assoc elements[];
} VMK_PACKED;

struct hv_input_install_intercept {
	__u64 partition_id;
	__u32 access_type;
	__u32 intercept_type;
	__u64 intercept_parameter;
} VMK_PACKED;

/* ---- include/hyperv/hvhdk.h --------------------------------------------------------------- */

#define HV_PARTITION_PROPERTY_PROCESSOR_CLOCK_FREQUENCY 0x00060009
#define HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING 0x00050005

struct hv_input_get_partition_property {
	__u64 partition_id;
	__u32 property_code;
	__u32 padding;
} VMK_PACKED;

struct hv_input_set_partition_property {
	__u64 partition_id;
	__u32 property_code;
	__u32 padding;
	__u64 property_value;
} VMK_PACKED;

struct hv_input_assert_virtual_interrupt {
	__u64 partition_id;
	__u64 control; /* interrupt_type:32 level_triggered:1 logical_dest_mode:1 */
	__u64 dest_addr;
	__u32 vector;
	__u8 target_vtl;
	__u8 rsvd_z0;
	__u16 rsvd_z1;
} VMK_PACKED;

#define HV_X64_REGISTER_CLASS_GENERAL 0
#define HV_X64_REGISTER_CLASS_IP 1
#define HV_X64_REGISTER_CLASS_XMM 2
#define HV_X64_REGISTER_CLASS_SEGMENT 3
#define HV_X64_REGISTER_CLASS_FLAGS 4
#define HV_VP_REGISTER_PAGE_VERSION_1 1

struct hv_vp_register_page {
	__u16 version;
	__u8 isvalid;
	__u8 rsvdz;
	__u32 dirty;
	__u64 gp_registers[16]; /* rax rcx rdx rbx rsp rbp rsi rdi r8-r15 */
	__u64 rip;
	__u64 rflags;
	struct hv_u128 xmm_registers[6];
	struct hv_x64_segment_register segment_registers[6]; /* es cs ss ds fs gs */
	__u64 cr0;
	__u64 cr3;
	__u64 cr4;
	__u64 cr8;
	__u64 efer;
	__u64 dr7;
	__u64 pending_interruption;
	__u64 interrupt_state;
	__u64 instruction_emulation_hints;
} VMK_PACKED;

struct hv_x64_intercept_message_header {
	__u32 vp_index;
	__u8 instruction_length_cr8; /* instruction_length:4 cr8:4 */
	__u8 intercept_access_type;
	__u16 execution_state;
	struct hv_x64_segment_register cs_segment;
	__u64 rip;
	__u64 rflags;
} VMK_PACKED;

struct hv_x64_io_port_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u16 port_number;
	__u8 access_info; /* access_size:3 string_op:1 rep_prefix:1 */
	__u8 instruction_byte_count;
	__u32 reserved;
	__u64 rax;
	__u8 instruction_bytes[16];
	struct hv_x64_segment_register ds_segment;
	struct hv_x64_segment_register es_segment;
	__u64 rcx;
	__u64 rsi;
	__u64 rdi;
} VMK_PACKED;

struct hv_x64_memory_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u32 cache_type;
	__u8 instruction_byte_count;
	__u8 memory_access_info; /* gva_valid:1 gva_gpa_valid:1 ... */
	__u8 tpr_priority;
	__u8 reserved1;
	__u64 guest_virtual_address;
	__u64 guest_physical_address;
	__u8 instruction_bytes[16];
} VMK_PACKED;

struct hv_x64_cpuid_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u64 rax;
	__u64 rcx;
	__u64 rdx;
	__u64 rbx;
	__u64 default_result_rax;
	__u64 default_result_rcx;
	__u64 default_result_rdx;
	__u64 default_result_rbx;
} VMK_PACKED;

struct hv_x64_msr_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u32 msr_number;
	__u32 reserved;
	__u64 rdx;
	__u64 rax;
} VMK_PACKED;

struct hv_x64_exception_intercept_message {
	struct hv_x64_intercept_message_header header;
	__u16 exception_vector;
	__u8 exception_info; /* error_code_valid:1 software_exception:1 */
	__u8 instruction_byte_count;
	__u32 error_code;
	__u64 exception_parameter;
	__u64 reserved;
	__u8 instruction_bytes[16];
	struct hv_x64_segment_register ds_segment;
	struct hv_x64_segment_register ss_segment;
	__u64 gprs[16]; /* rax rcx rdx rbx rsp rbp rsi rdi r8-r15 */
} VMK_PACKED;

struct hv_x64_halt_message {
	struct hv_x64_intercept_message_header header;
} VMK_PACKED;

struct hv_x64_apic_eoi_message {
	__u32 vp_index;
	__u32 interrupt_vector;
} VMK_PACKED;

struct hv_local_interrupt_controller_state {
	__u32 apic_id;
	__u32 apic_version;
	__u32 apic_ldr;
	__u32 apic_dfr;
	__u32 apic_spurious;
	__u32 apic_isr[8];
	__u32 apic_tmr[8];
	__u32 apic_irr[8];
	__u32 apic_esr;
	__u32 apic_icr_high;
	__u32 apic_icr_low;
	__u32 apic_lvt_timer;
	__u32 apic_lvt_thermal;
	__u32 apic_lvt_perfmon;
	__u32 apic_lvt_lint0;
	__u32 apic_lvt_lint1;
	__u32 apic_lvt_error;
	__u32 apic_lvt_cmci;
	__u32 apic_error_status;
	__u32 apic_initial_count;
	__u32 apic_counter_value;
	__u32 apic_divide_configuration;
	__u32 apic_remote_read;
} VMK_PACKED;

#endif /* VMMKIT_MSHV_ABI_H */
