"""cffi build script for ``vmmkit_mshv._native`` (out-of-line API mode).

The layouts come from ``mshv_abi.h`` (this package's transcription of the upstream headers; see
its comment): every struct is declared here with ``...;`` so the C compiler fills in sizes and
offsets from that header, and the ioctl numbers are the header's ``_IOW``/``_IOWR`` expressions
evaluated by the compiler. ``tests/unit/mshv/test_layout.py`` pins both to the upstream numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

#define MSHV_CREATE_PARTITION ...
#define MSHV_INITIALIZE_PARTITION ...
#define MSHV_CREATE_VP ...
#define MSHV_SET_GUEST_MEMORY ...
#define MSHV_IRQFD ...
#define MSHV_IOEVENTFD ...
#define MSHV_SET_MSI_ROUTING ...
#define MSHV_GET_GPAP_ACCESS_BITMAP ...
#define MSHV_ROOT_HVCALL ...
#define MSHV_RUN_VP ...
#define MSHV_GET_VP_STATE ...
#define MSHV_SET_VP_STATE ...

struct mshv_create_partition { __u64 pt_flags; __u64 pt_isolation; ...; };
struct mshv_create_vp { __u32 vp_index; ...; };
struct mshv_user_mem_region { __u64 size; __u64 guest_pfn; __u64 userspace_addr; __u8 flags;
                              __u8 rsvd[7]; ...; };
struct mshv_user_irqfd { __s32 fd; __s32 resamplefd; __u32 gsi; __u32 flags; ...; };
struct mshv_user_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags;
                             __u8 rsvd[4]; ...; };
struct mshv_user_irq_entry { __u32 gsi; __u32 address_lo; __u32 address_hi; __u32 data; ...; };
struct mshv_user_irq_table { __u32 nr; __u32 rsvd; ...; };  /* entries[] follow */
struct mshv_gpap_access_bitmap { __u8 access_type; __u8 access_op; __u8 rsvd[6];
                                 __u64 page_count; __u64 gpap_base; __u64 bitmap_ptr; ...; };
struct mshv_root_hvcall { __u16 code; __u16 reps; __u16 in_sz; __u16 out_sz; __u16 status;
                          __u8 rsvd[6]; __u64 in_ptr; __u64 out_ptr; ...; };
struct mshv_run_vp { __u8 msg_buf[256]; ...; };
struct mshv_get_set_vp_state { __u8 type; __u8 rsvd[3]; __u32 buf_sz; __u64 buf_ptr; ...; };

struct hv_u128 { __u64 low_part; __u64 high_part; ...; };
struct hv_message_header { __u32 message_type; __u8 payload_size; __u8 message_flags;
                           __u8 reserved[2]; __u64 sender; ...; };
struct hv_message { struct hv_message_header header; __u64 payload[30]; ...; };
struct hv_x64_segment_register { __u64 base; __u32 limit; __u16 selector; __u16 attributes; ...; };
struct hv_x64_table_register { __u16 pad[3]; __u16 limit; __u64 base; ...; };
union hv_register_value { struct hv_u128 reg128; __u64 reg64; __u32 reg32; __u16 reg16; __u8 reg8;
                          struct hv_x64_segment_register segment;
                          struct hv_x64_table_register table; ...; };
struct hv_register_assoc { __u32 name; __u32 reserved1; __u64 reserved2;
                           union hv_register_value value; ...; };
/* names[] / elements[] follow the header */
struct hv_input_get_vp_registers { __u64 partition_id; __u32 vp_index; __u8 input_vtl;
                                   __u8 rsvd_z8; __u16 rsvd_z16; ...; };
struct hv_input_set_vp_registers { __u64 partition_id; __u32 vp_index; __u8 input_vtl;
                                   __u8 rsvd_z8; __u16 rsvd_z16; ...; };
struct hv_input_install_intercept { __u64 partition_id; __u32 access_type; __u32 intercept_type;
                                    __u64 intercept_parameter; ...; };
struct hv_input_get_partition_property { __u64 partition_id; __u32 property_code;
                                         __u32 padding; ...; };
struct hv_input_set_partition_property { __u64 partition_id; __u32 property_code; __u32 padding;
                                         __u64 property_value; ...; };
struct hv_input_assert_virtual_interrupt { __u64 partition_id; __u64 control; __u64 dest_addr;
                                           __u32 vector; __u8 target_vtl; __u8 rsvd_z0;
                                           __u16 rsvd_z1; ...; };
struct hv_vp_register_page { __u16 version; __u8 isvalid; __u8 rsvdz; __u32 dirty;
                             __u64 gp_registers[16]; __u64 rip; __u64 rflags;
                             struct hv_u128 xmm_registers[6];
                             struct hv_x64_segment_register segment_registers[6];
                             __u64 cr0; __u64 cr3; __u64 cr4; __u64 cr8; __u64 efer; __u64 dr7;
                             __u64 pending_interruption; __u64 interrupt_state;
                             __u64 instruction_emulation_hints; ...; };
struct hv_x64_intercept_message_header { __u32 vp_index; __u8 instruction_length_cr8;
                                         __u8 intercept_access_type; __u16 execution_state;
                                         struct hv_x64_segment_register cs_segment;
                                         __u64 rip; __u64 rflags; ...; };
struct hv_x64_io_port_intercept_message { struct hv_x64_intercept_message_header header;
    __u16 port_number; __u8 access_info; __u8 instruction_byte_count; __u32 reserved; __u64 rax;
    __u8 instruction_bytes[16]; struct hv_x64_segment_register ds_segment;
    struct hv_x64_segment_register es_segment; __u64 rcx; __u64 rsi; __u64 rdi; ...; };
struct hv_x64_memory_intercept_message { struct hv_x64_intercept_message_header header;
    __u32 cache_type; __u8 instruction_byte_count; __u8 memory_access_info; __u8 tpr_priority;
    __u8 reserved1; __u64 guest_virtual_address; __u64 guest_physical_address;
    __u8 instruction_bytes[16]; ...; };
struct hv_x64_cpuid_intercept_message { struct hv_x64_intercept_message_header header;
    __u64 rax; __u64 rcx; __u64 rdx; __u64 rbx; __u64 default_result_rax;
    __u64 default_result_rcx; __u64 default_result_rdx; __u64 default_result_rbx; ...; };
struct hv_x64_msr_intercept_message { struct hv_x64_intercept_message_header header;
    __u32 msr_number; __u32 reserved; __u64 rdx; __u64 rax; ...; };
struct hv_x64_exception_intercept_message { struct hv_x64_intercept_message_header header;
    __u16 exception_vector; __u8 exception_info; __u8 instruction_byte_count; __u32 error_code;
    __u64 exception_parameter; __u64 reserved; __u8 instruction_bytes[16];
    struct hv_x64_segment_register ds_segment; struct hv_x64_segment_register ss_segment;
    __u64 gprs[16]; ...; };
struct hv_x64_halt_message { struct hv_x64_intercept_message_header header; ...; };
struct hv_x64_apic_eoi_message { __u32 vp_index; __u32 interrupt_vector; ...; };
struct hv_local_interrupt_controller_state { __u32 apic_id; __u32 apic_version; __u32 apic_ldr;
    __u32 apic_dfr; __u32 apic_spurious; __u32 apic_isr[8]; __u32 apic_tmr[8]; __u32 apic_irr[8];
    __u32 apic_esr; __u32 apic_icr_high; __u32 apic_icr_low; __u32 apic_lvt_timer;
    __u32 apic_lvt_thermal; __u32 apic_lvt_perfmon; __u32 apic_lvt_lint0; __u32 apic_lvt_lint1;
    __u32 apic_lvt_error; __u32 apic_lvt_cmci; __u32 apic_error_status; __u32 apic_initial_count;
    __u32 apic_counter_value; __u32 apic_divide_configuration; __u32 apic_remote_read; ...; };

/* libc, through thin wrappers with fixed argument types (ioctl is variadic) */
int vmk_ioctl(int fd, unsigned long request, uintptr_t arg);
uintptr_t vmk_mmap_shared(int fd, size_t length, long offset);
int vmk_munmap(uintptr_t addr, size_t length);
int vmk_install_kick_handler(int sig);
void vmk_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4]);

/* the run loop (mshv_runloop.h) */
typedef int (*vmk_mshv_ioctl_fn)(int fd, unsigned long request, uintptr_t arg);
#define VMK_MSHV_MAX_SINKS ...
struct vmk_mshv_sink { uint16_t port; int fd; uint8_t read_value; int used; ...; };
struct vmk_mshv_sinks { struct vmk_mshv_sink sink[...]; ...; };
struct vmk_mshv_vp { int fd; vmk_mshv_ioctl_fn ioctl; struct vmk_mshv_sinks *sinks; uint8_t *register_page;
                     int kicked; uint64_t runs, sink_writes, sink_reads, returned; uint8_t msg[256]; ...; };
int vmk_mshv_host_ioctl(int fd, unsigned long request, uintptr_t arg);
int vmk_mshv_run(struct vmk_mshv_vp *vp);
extern "Python+C" int vmk_mshv_py_ioctl(int fd, unsigned long request, uintptr_t arg);
"""

SOURCE = r"""
#include <stdint.h>
#include <sys/ioctl.h>
#include <cpuid.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include "mshv_abi.h"
#include "mshv_runloop.h"

static int vmk_ioctl(int fd, unsigned long request, uintptr_t arg)
{
	return ioctl(fd, request, (void *)arg);
}

static uintptr_t vmk_mmap_shared(int fd, size_t length, long offset)
{
	void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, offset);
	return p == MAP_FAILED ? 0 : (uintptr_t)p;
}

static int vmk_munmap(uintptr_t addr, size_t length)
{
	return munmap((void *)addr, length);
}

/* The host CPU's CPUID (what a root partition's VMM starts from when it builds a guest's). */
static void vmk_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
	__cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
}

static void vmk_kick_noop(int sig)
{
	(void)sig;
}

/* A handler that does nothing, installed without SA_RESTART: a kick signal sent to a vCPU
 * thread blocked in MSHV_RUN_VP makes the ioctl fail with EINTR (the kernel's
 * mshv_run_vp_with_hyp_scheduler returns -EINTR when its wait is interrupted). */
static int vmk_install_kick_handler(int sig)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = vmk_kick_noop;
	sigemptyset(&sa.sa_mask);
	return sigaction(sig, &sa, NULL);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vmmkit_mshv._native",
    SOURCE,
    # cffi wants the path relative to the directory setup.py runs in.
    sources=[os.path.relpath(HERE / "mshv_runloop.c")],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
