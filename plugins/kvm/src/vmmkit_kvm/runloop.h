/*
 * vmmkit-kvm native run loop: KVM_RUN plus the exits served without Python.
 *
 * The structures here are private to the backend: Python sees struct vmk_vm and
 * struct vmk_vcpu only as opaque pointers, and reads an exit that needs Python
 * from struct vmk_exit, whose every field was bounds-checked against the kvm_run
 * mapping before it was filled in.
 */
#ifndef VMMKIT_KVM_RUNLOOP_H
#define VMMKIT_KVM_RUNLOOP_H

#include <stddef.h>
#include <stdint.h>

/* What vmk_run() returns (negative values are -errno of a failed KVM_RUN). */
#define VMK_EXIT_PIO 1            /* port access for Python: addr, size, count, data */
#define VMK_EXIT_MMIO 2           /* MMIO access for Python: addr, size, data */
#define VMK_EXIT_HLT 3
#define VMK_EXIT_SHUTDOWN 4       /* triple fault */
#define VMK_EXIT_SYSTEM_EVENT 5   /* words[0] = type, words[1..] = data */
#define VMK_EXIT_INTERNAL_ERROR 6 /* words[0] = suberror, words[1..nwords-1] = data */
#define VMK_EXIT_FAIL_ENTRY 7     /* words[0] = reason, words[1] = cpu */
#define VMK_EXIT_DEBUG 8          /* x86: words = exception, pc, dr6, dr7; arm64: esr, far */
#define VMK_EXIT_INTERRUPTED 9    /* kicked */
#define VMK_EXIT_UNKNOWN 10       /* kvm_reason says which; arm64 KVM_EXIT_ARM_NISV: words = esr_iss, fault_ipa */
#define VMK_EXIT_BAD_RUN 11       /* a kvm_run field failed a bounds check; words say which */
#define VMK_EXIT_CALLBACK_ERROR 12 /* the Python callback raised (callback mode) */

/* I/O kinds handed to the Python callback, and the low bits of a packed access. */
#define VMK_IO_PIO_READ 0
#define VMK_IO_PIO_WRITE 1
#define VMK_IO_MMIO_READ 2
#define VMK_IO_MMIO_WRITE 3

/* In return mode a single access (count 1, address below 2^56) comes back from vmk_run() as
 * one packed value instead of VMK_EXIT_PIO/VMK_EXIT_MMIO, so Python decodes it without
 * reading the struct: (addr << VMK_PACKED_ADDR_SHIFT) | (size << VMK_PACKED_SIZE_SHIFT) | kind,
 * kind a VMK_IO_*. It is always >= VMK_PACKED_MIN (size >= 1), above every VMK_EXIT_*.
 * A write's bytes are in vmk_exit.buf; a read's answer goes into vmk_exit.buf (preset to
 * ones) and the next vmk_run() with the same vmk_exit copies it to the guest. */
#define VMK_PACKED_MIN 16
#define VMK_PACKED_SIZE_SHIFT 4
#define VMK_PACKED_ADDR_SHIFT 8

/* Exit counters (index into vmk_vcpu_counts()). */
#define VMK_COUNT_IO 0
#define VMK_COUNT_IO_NATIVE 1
#define VMK_COUNT_MMIO 2
#define VMK_COUNT_COALESCED 3
#define VMK_COUNT_COALESCED_NATIVE 4
#define VMK_COUNT_HLT 5
#define VMK_COUNT_INTR 6
#define VMK_COUNT_SHUTDOWN 7
#define VMK_COUNT_SYSTEM_EVENT 8
#define VMK_COUNT_INTERNAL_ERROR 9
#define VMK_COUNT_FAIL_ENTRY 10
#define VMK_COUNT_DEBUG 11
#define VMK_COUNT_OTHER 12
#define VMK_NCOUNTS 13

#define VMK_MAX_SINKS 16
#define VMK_EXIT_WORDS 18

struct vmk_exit {
    uint32_t code;
    uint32_t kvm_reason;   /* kvm_run->exit_reason of the exit */
    uint64_t addr;         /* port or guest-physical address */
    uint32_t size;         /* bytes per access: 1, 2, 4 (port) or 1..8 (MMIO) */
    uint32_t count;        /* accesses (string port I/O: > 1) */
    uint32_t is_write;
    uint32_t nwords;
    char *data;            /* size * count bytes, inside the vCPU's own buffers */
    uint64_t words[VMK_EXIT_WORDS];
    char buf[8];           /* a packed access's data (see VMK_PACKED_MIN) */
};

struct vmk_vm;
struct vmk_vcpu;

struct vmk_vm *vmk_vm_new(int vm_fd);
void vmk_vm_free(struct vmk_vm *vm);
/* Sink formats: the bytes as written, or one line per byte with the time since VM creation. */
enum { VMK_SINK_RAW = 0, VMK_SINK_TEXT = 1, VMK_SINK_JSON = 2 };
/* format: VMK_SINK_*. TEXT lines read "[S.UUUUUU] <label> 0xNN"; JSON lines are objects
 * {"code": "0xNN", "elapsed": "S.UUUUUU", "event": "<label>", "level": "info",
 * "timestamp": "<ISO 8601 UTC>"}, as vmmkit's JSON log renders the same event.
 * Returns 0, or -EEXIST (port taken), -ENOSPC (table full), -EINVAL. */
int vmk_vm_add_sink(struct vmk_vm *vm, uint32_t port, int fd, int format,
                    uint32_t read_value, const char *label);
int vmk_vm_remove_sink(struct vmk_vm *vm, uint32_t port);

/* Maps the vCPU's kvm_run. ring_page: coalesced ring page offset (0: none).
 * valid_regs: KVM_SYNC_X86_* bits to ask for on every exit. NULL + errno on failure. */
struct vmk_vcpu *vmk_vcpu_new(struct vmk_vm *vm, int vcpu_fd, size_t mmap_size,
                              uint32_t ring_page, uint32_t valid_regs);
void vmk_vcpu_free(struct vmk_vcpu *v);
/* Dispatch through vmk_py_io() with this handle; NULL: return I/O exits to the caller. */
void vmk_vcpu_set_callback(struct vmk_vcpu *v, void *handle);

/* A VMK_EXIT_* code, a packed access (>= VMK_PACKED_MIN), or -errno of a failed KVM_RUN. */
int64_t vmk_run(struct vmk_vcpu *v, struct vmk_exit *ex);
/* vmk_run() with the vmk_exit bound by vmk_vcpu_set_exit(): one argument, which cffi passes
 * without building an argument tuple (the Python dispatch path calls it once per exit). */
void vmk_vcpu_set_exit(struct vmk_vcpu *v, struct vmk_exit *ex);
int64_t vmk_vcpu_run(struct vmk_vcpu *v);
void vmk_vcpu_kick(struct vmk_vcpu *v);
void vmk_vcpu_clear_kick(struct vmk_vcpu *v);
int vmk_vcpu_kicked(struct vmk_vcpu *v);
int vmk_vcpu_running(struct vmk_vcpu *v);
void vmk_vcpu_counts(struct vmk_vcpu *v, uint64_t *out, size_t n);

/* Sync regs: valid once a KVM_RUN has returned; writes are applied by the next KVM_RUN. */
int vmk_vcpu_sync_valid(struct vmk_vcpu *v);
/* The KVM_SYNC_X86_* bits the last KVM_RUN stored (valid to read, and to mark dirty). */
uint32_t vmk_vcpu_valid_regs(struct vmk_vcpu *v);
/* The bits to ask for from the next KVM_RUN on (not while the vCPU runs). */
void vmk_vcpu_set_valid_regs(struct vmk_vcpu *v, uint32_t bits);
#ifdef __x86_64__
/* x86's struct kvm_sync_regs (arm64's holds only device_irq_level). */
struct kvm_regs *vmk_vcpu_sync_regs(struct vmk_vcpu *v);
struct kvm_sregs *vmk_vcpu_sync_sregs(struct vmk_vcpu *v);
#endif
void vmk_vcpu_mark_dirty(struct vmk_vcpu *v, uint32_t bits);

/* The check applied to a KVM_EXIT_IO before its data is touched (exported for tests). */
int vmk_io_in_bounds(uint64_t run_size, uint32_t size, uint32_t count, uint64_t data_offset);
size_t vmk_kvm_run_size(void);

/* ioctl() without varargs, for cffi; -1 and errno on failure. */
int vmk_ioctl_ptr(int fd, unsigned long request, void *arg);
int vmk_ioctl_int(int fd, unsigned long request, unsigned long arg);

/* Harvests a KVM dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL], Documentation/virt/kvm/api.rst):
 * from entry *fetch on, each entry whose flags say DIRTY (loaded with acquire ordering) gives its
 * slot and offset and is marked RESET (stored with release ordering), until an entry that is not
 * dirty or max entries; *fetch advances. Returns how many were harvested. */
uint32_t vmk_dirty_ring_harvest(void *ring, uint32_t entries, uint32_t *fetch,
                                uint32_t *slots, uint64_t *offsets, uint32_t max);

/* After the ring overflowed (KVM overwrites entries once the ring is full and then waits for
 * RESET on entries it already reset): if a DIRTY entry lies ahead of *fetch within the ring,
 * marks the invalid entries before it RESET (compare-and-exchange from 0), moves *fetch past them
 * and returns how many it skipped; else 0. */
uint32_t vmk_dirty_ring_resync(void *ring, uint32_t entries, uint32_t *fetch);

int vmk_kick_signal(void);
/* Installs the no-op kick handler (no SA_RESTART). Idempotent. 0 or -errno. */
int vmk_install_kick_handler(void);

/* Callback into Python (cffi extern "Python+C"): 0 on success, -1 if it raised. */
int vmk_py_io(void *handle, uint32_t kind, uint64_t addr, uint32_t size,
              uint32_t count, char *data);

#endif
