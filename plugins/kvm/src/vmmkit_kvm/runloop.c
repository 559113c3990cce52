/*
 * vmmkit-kvm native run loop.
 *
 * The same loop serves x86-64 and arm64 hosts (built from each one's <linux/kvm.h>); the few
 * architecture-specific fields (x86's sync regs and debug registers, arm64's NISV exit) are
 * under #ifdef. arm64 has no port I/O, so its loop only ever sees MMIO exits.
 *
 * vmk_run() enters the guest with KVM_RUN (called from Python through cffi, so the GIL is
 * released for the whole loop) and serves, without Python:
 *   - port writes and reads of the VM-wide port sinks (debug console, boot-progress port),
 *   - the coalesced MMIO/PIO ring, whose entries for a sink port are served the same way.
 * Every other port or MMIO access is handed to Python, either by returning VMK_EXIT_PIO /
 * VMK_EXIT_MMIO (the caller dispatches and calls vmk_run() again, which completes the access
 * on the next KVM_RUN) or by calling vmk_py_io() in callback mode.
 *
 * Kicks: vmk_vcpu_kick() sets kvm_run->immediate_exit and sends the kick signal to the
 * thread inside vmk_run(). KVM completes a pending port/MMIO read on the next KVM_RUN before
 * it looks at immediate_exit (see "immediate_exit" in the KVM API documentation), so an exit
 * handed to Python when the kick lands is finished before vmk_run() reports the kick.
 *
 * Everything read from kvm_run (I/O offsets and sizes, data counts, the coalesced ring
 * indices) is checked against the mapping before use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/kvm.h>

#include "runloop.h"

struct vmk_sink {
    uint32_t port;
    int fd;
    int format;                  /* VMK_SINK_* */
    uint8_t read_value;
    char label[32];
};

struct vmk_vm {
    int fd;
    pthread_rwlock_t sink_lock;
    int nsinks;
    struct vmk_sink sinks[VMK_MAX_SINKS];
    /* One bit per port that has a sink (atomic; written under sink_lock): a port without one
     * goes to Python without taking the lock. */
    uint64_t sink_ports[65536 / 64];
    pthread_mutex_t ring_lock;   /* the coalesced ring is shared by all vCPUs */
    struct timespec t0;          /* timestamped sinks count from VM creation */
};

enum { PENDING_NONE = 0, PENDING_EXIT = 1, PENDING_EINTR = 2 };

struct vmk_vcpu {
    int fd;
    struct kvm_run *run;
    size_t run_size;
    struct kvm_coalesced_mmio_ring *ring;
    uint32_t ring_max;
    struct vmk_vm *vm;
    void *py_handle;
    int tid;            /* the thread inside vmk_run(), 0 when none (atomic) */
    int kicked;         /* atomic */
    int pending;
    int sync_valid;
    uint32_t valid_regs;  /* KVM_SYNC_X86_* asked for from the next KVM_RUN on */
    uint32_t synced;      /* those the last KVM_RUN stored (what the sync area holds) */
    uint8_t ring_data[8];
    /* A packed read handed to Python: where its answer goes, from which vmk_exit's buf. */
    uint8_t *read_dst;
    uint32_t read_len;
    const struct vmk_exit *read_ex;
    struct vmk_exit *exit;  /* vmk_vcpu_run()'s (vmk_vcpu_set_exit) */
    uint64_t counts[VMK_NCOUNTS];
};

/* -- kick signal -------------------------------------------------------------------------- */

int vmk_kick_signal(void) { return SIGRTMIN + 1; }

static void vmk_kick_handler(int sig) { (void)sig; }

int vmk_install_kick_handler(void)
{
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static int installed;
    int rc = 0;
    pthread_mutex_lock(&lock);
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = vmk_kick_handler;
        sa.sa_flags = 0; /* no SA_RESTART: a blocked KVM_RUN must return EINTR */
        sigemptyset(&sa.sa_mask);
        if (sigaction(vmk_kick_signal(), &sa, NULL) < 0)
            rc = -errno;
        else
            installed = 1;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

static __thread int vmk_thread_unblocked;
/* gettid() once per thread, not a system call per vmk_run(); a forked child starts over. */
static __thread int vmk_thread_tid;
static pthread_once_t vmk_atfork_once = PTHREAD_ONCE_INIT;

static void vmk_forget_tid(void) { vmk_thread_tid = 0; }

static void vmk_register_atfork(void) { pthread_atfork(NULL, NULL, vmk_forget_tid); }

static int vmk_tid(void)
{
    if (!vmk_thread_tid) {
        pthread_once(&vmk_atfork_once, vmk_register_atfork);
        vmk_thread_tid = (int)syscall(SYS_gettid);
    }
    return vmk_thread_tid;
}

static void vmk_unblock_kick_signal(void)
{
    if (!vmk_thread_unblocked) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, vmk_kick_signal());
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
        vmk_thread_unblocked = 1;
    }
}

/* -- VM: port sinks ----------------------------------------------------------------------- */

struct vmk_vm *vmk_vm_new(int vm_fd)
{
    struct vmk_vm *vm = calloc(1, sizeof(*vm));
    if (!vm)
        return NULL;
    vm->fd = vm_fd;
    pthread_rwlock_init(&vm->sink_lock, NULL);
    pthread_mutex_init(&vm->ring_lock, NULL);
    clock_gettime(CLOCK_MONOTONIC, &vm->t0);
    return vm;
}

void vmk_vm_free(struct vmk_vm *vm)
{
    if (!vm)
        return;
    pthread_rwlock_destroy(&vm->sink_lock);
    pthread_mutex_destroy(&vm->ring_lock);
    free(vm);
}

int vmk_vm_add_sink(struct vmk_vm *vm, uint32_t port, int fd, int format,
                    uint32_t read_value, const char *label)
{
    int rc = 0;
    if (port > 0xffff || fd < 0 || read_value > 0xff || format < VMK_SINK_RAW || format > VMK_SINK_JSON)
        return -EINVAL;
    pthread_rwlock_wrlock(&vm->sink_lock);
    for (int i = 0; i < vm->nsinks; i++) {
        if (vm->sinks[i].port == port) {
            rc = -EEXIST;
            goto out;
        }
    }
    if (vm->nsinks == VMK_MAX_SINKS) {
        rc = -ENOSPC;
        goto out;
    }
    struct vmk_sink *s = &vm->sinks[vm->nsinks];
    memset(s, 0, sizeof(*s));
    s->port = port;
    s->fd = fd;
    s->format = format;
    s->read_value = (uint8_t)read_value;
    __atomic_or_fetch(&vm->sink_ports[port / 64], 1ULL << (port % 64), __ATOMIC_RELEASE);
    if (label && label[0]) {
        /* Printable ASCII without quote or backslash, so it goes into a JSON string as is. */
        size_t n = 0;
        for (; label[n] && n < sizeof(s->label) - 1; n++) {
            char c = label[n];
            s->label[n] = (c < 0x20 || c > 0x7e || c == '"' || c == '\\') ? '_' : c;
        }
        s->label[n] = 0;
    } else {
        snprintf(s->label, sizeof(s->label), "port 0x%x", port);
    }
    vm->nsinks++;
out:
    pthread_rwlock_unlock(&vm->sink_lock);
    return rc;
}

int vmk_vm_remove_sink(struct vmk_vm *vm, uint32_t port)
{
    int rc = -ENOENT;
    pthread_rwlock_wrlock(&vm->sink_lock);
    for (int i = 0; i < vm->nsinks; i++) {
        if (vm->sinks[i].port == port) {
            __atomic_and_fetch(&vm->sink_ports[port / 64], ~(1ULL << (port % 64)), __ATOMIC_RELEASE);
            vm->sinks[i] = vm->sinks[vm->nsinks - 1];
            vm->nsinks--;
            rc = 0;
            break;
        }
    }
    pthread_rwlock_unlock(&vm->sink_lock);
    return rc;
}

static void vmk_write_all(int fd, const uint8_t *buf, size_t len)
{
    /* Bounded: a full or closed sink loses output, it never stalls the vCPU forever. */
    for (int tries = 0; len > 0 && tries < 64; tries++) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void vmk_sink_write(struct vmk_vm *vm, const struct vmk_sink *s, const uint8_t *data,
                           size_t len)
{
    if (s->format == VMK_SINK_RAW) {
        vmk_write_all(s->fd, data, len);
        return;
    }
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ns = (long long)(now.tv_sec - vm->t0.tv_sec) * 1000000000LL +
                   (now.tv_nsec - vm->t0.tv_nsec);
    if (ns < 0)
        ns = 0;
    char wall[40] = "";
    if (s->format == VMK_SINK_JSON) {
        struct timespec real;
        struct tm tm;
        clock_gettime(CLOCK_REALTIME, &real);
        gmtime_r(&real.tv_sec, &tm);
        size_t w = strftime(wall, sizeof(wall), "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(wall + w, sizeof(wall) - w, ".%06ldZ", real.tv_nsec / 1000);
    }
    char line[192];
    for (size_t i = 0; i < len; i++) {
        int n;
        if (s->format == VMK_SINK_JSON)
            n = snprintf(line, sizeof(line),
                         "{\"code\": \"0x%02x\", \"elapsed\": \"%lld.%06lld\", \"event\": \"%s\", "
                         "\"level\": \"info\", \"timestamp\": \"%s\"}\n",
                         data[i], ns / 1000000000LL, (ns % 1000000000LL) / 1000, s->label, wall);
        else
            n = snprintf(line, sizeof(line), "[%lld.%06lld] %s 0x%02x\n", ns / 1000000000LL,
                         (ns % 1000000000LL) / 1000, s->label, data[i]);
        if (n > 0)
            vmk_write_all(s->fd, (const uint8_t *)line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
    }
}

/* Serve a port access natively if ``port`` is a sink. Returns 1 if served. */
static int vmk_sink_serve(struct vmk_vm *vm, uint32_t port, int is_write, uint8_t *data,
                          size_t len)
{
    int served = 0;
    if (port > 0xffff ||
        !(__atomic_load_n(&vm->sink_ports[port / 64], __ATOMIC_ACQUIRE) & (1ULL << (port % 64))))
        return 0; /* no sink: an access racing with vmk_vm_add_sink() comes before it */
    pthread_rwlock_rdlock(&vm->sink_lock);
    for (int i = 0; i < vm->nsinks; i++) {
        const struct vmk_sink *s = &vm->sinks[i];
        if (s->port != port)
            continue;
        if (is_write)
            vmk_sink_write(vm, s, data, len);
        else
            memset(data, s->read_value, len);
        served = 1;
        break;
    }
    pthread_rwlock_unlock(&vm->sink_lock);
    return served;
}

/* -- vCPU --------------------------------------------------------------------------------- */

struct vmk_vcpu *vmk_vcpu_new(struct vmk_vm *vm, int vcpu_fd, size_t mmap_size,
                              uint32_t ring_page, uint32_t valid_regs)
{
    long page = sysconf(_SC_PAGESIZE);
    if (mmap_size < sizeof(struct kvm_run) || mmap_size > (1u << 24)) {
        errno = EINVAL;
        return NULL;
    }
    struct vmk_vcpu *v = calloc(1, sizeof(*v));
    if (!v)
        return NULL;
    void *p = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        free(v);
        errno = e;
        return NULL;
    }
    v->fd = vcpu_fd;
    v->run = p;
    v->run_size = mmap_size;
    v->vm = vm;
    if (ring_page && (size_t)(ring_page + 1) * (size_t)page <= mmap_size) {
        v->ring = (struct kvm_coalesced_mmio_ring *)((uint8_t *)p + (size_t)ring_page * page);
        v->ring_max = (uint32_t)((page - sizeof(struct kvm_coalesced_mmio_ring)) /
                                 sizeof(struct kvm_coalesced_mmio));
    }
    v->valid_regs = valid_regs;
    v->run->kvm_valid_regs = valid_regs;
    return v;
}

void vmk_vcpu_free(struct vmk_vcpu *v)
{
    if (!v)
        return;
    munmap(v->run, v->run_size);
    free(v);
}

void vmk_vcpu_set_callback(struct vmk_vcpu *v, void *handle) { v->py_handle = handle; }

void vmk_vcpu_kick(struct vmk_vcpu *v)
{
    __atomic_store_n(&v->kicked, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    int tid = __atomic_load_n(&v->tid, __ATOMIC_SEQ_CST);
    if (tid > 0)
        syscall(SYS_tgkill, getpid(), tid, vmk_kick_signal());
}

void vmk_vcpu_clear_kick(struct vmk_vcpu *v)
{
    __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&v->kicked, 0, __ATOMIC_SEQ_CST);
}

int vmk_vcpu_kicked(struct vmk_vcpu *v) { return __atomic_load_n(&v->kicked, __ATOMIC_SEQ_CST); }

int vmk_vcpu_running(struct vmk_vcpu *v) { return __atomic_load_n(&v->tid, __ATOMIC_SEQ_CST) != 0; }

void vmk_vcpu_counts(struct vmk_vcpu *v, uint64_t *out, size_t n)
{
    for (size_t i = 0; i < n && i < VMK_NCOUNTS; i++)
        out[i] = __atomic_load_n(&v->counts[i], __ATOMIC_RELAXED);
}

int vmk_vcpu_sync_valid(struct vmk_vcpu *v) { return v->sync_valid; }
uint32_t vmk_vcpu_valid_regs(struct vmk_vcpu *v) { return v->synced; }
void vmk_vcpu_set_valid_regs(struct vmk_vcpu *v, uint32_t bits)
{
    v->valid_regs = bits;
    v->run->kvm_valid_regs = bits;
}
#ifdef __x86_64__
struct kvm_regs *vmk_vcpu_sync_regs(struct vmk_vcpu *v) { return &v->run->s.regs.regs; }
struct kvm_sregs *vmk_vcpu_sync_sregs(struct vmk_vcpu *v) { return &v->run->s.regs.sregs; }
#endif
void vmk_vcpu_mark_dirty(struct vmk_vcpu *v, uint32_t bits) { v->run->kvm_dirty_regs |= bits & v->synced; }

int vmk_io_in_bounds(uint64_t run_size, uint32_t size, uint32_t count, uint64_t data_offset)
{
    if (size != 1 && size != 2 && size != 4)
        return 0;
    if (count == 0 || data_offset < sizeof(struct kvm_run) || data_offset > run_size)
        return 0;
    return (uint64_t)size * count <= run_size - data_offset;
}

static inline void count(struct vmk_vcpu *v, int which)
{
    __atomic_store_n(&v->counts[which], v->counts[which] + 1, __ATOMIC_RELAXED);
}

static int64_t bad_run(struct vmk_exit *ex, uint64_t what, uint64_t a, uint64_t b, uint64_t c)
{
    ex->code = VMK_EXIT_BAD_RUN;
    ex->nwords = 4;
    ex->words[0] = what;
    ex->words[1] = a;
    ex->words[2] = b;
    ex->words[3] = c;
    return VMK_EXIT_BAD_RUN;
}

_Static_assert(VMK_EXIT_CALLBACK_ERROR < VMK_PACKED_MIN, "packed accesses start above the exit codes");
_Static_assert(sizeof(((struct vmk_exit *)0)->buf) >= sizeof(((struct kvm_run *)0)->mmio.data),
               "vmk_exit.buf holds any single access");

/* Hand one access to Python: in callback mode call it and return 0 (go on), else fill
 * ``ex`` and return the code the caller must dispatch (a packed access if it is a single one). */
static int64_t to_python(struct vmk_vcpu *v, struct vmk_exit *ex, int code, uint64_t addr,
                         uint32_t size, uint32_t count, int is_write, uint8_t *data)
{
    uint32_t kind = code == VMK_EXIT_PIO ? (is_write ? VMK_IO_PIO_WRITE : VMK_IO_PIO_READ)
                                         : (is_write ? VMK_IO_MMIO_WRITE : VMK_IO_MMIO_READ);
    if (v->py_handle) {
        if (!is_write)
            memset(data, 0xff, (size_t)size * count); /* the answer if Python raises */
        if (vmk_py_io(v->py_handle, kind, addr, size, count, (char *)data) == 0)
            return 0;
        ex->code = VMK_EXIT_CALLBACK_ERROR;
        ex->nwords = 0;
        return VMK_EXIT_CALLBACK_ERROR;
    }
    if (count == 1 && size <= sizeof(ex->buf) && addr < (1ULL << (64 - VMK_PACKED_ADDR_SHIFT - 1))) {
        if (is_write) {
            memcpy(ex->buf, data, size);
        } else {
            memset(ex->buf, 0xff, sizeof(ex->buf)); /* the answer if Python raises */
            v->read_dst = data;
            v->read_len = size;
            v->read_ex = ex;
        }
        return (int64_t)(addr << VMK_PACKED_ADDR_SHIFT | (uint64_t)size << VMK_PACKED_SIZE_SHIFT | kind);
    }
    ex->code = (uint32_t)code;
    ex->addr = addr;
    ex->size = size;
    ex->count = count;
    ex->is_write = (uint32_t)is_write;
    ex->data = (char *)data;
    ex->nwords = 0;
    return code;
}

/* Process the coalesced ring. Returns 0 when it is empty, else a code for the caller. */
static int64_t drain_ring(struct vmk_vcpu *v, struct vmk_exit *ex)
{
    struct kvm_coalesced_mmio_ring *ring = v->ring;
    if (!ring)
        return 0;
    /* Empty (the common case): no lock. An entry another vCPU's exit adds meanwhile is
     * drained at the next exit, as it would be had it come a moment later. */
    if (__atomic_load_n(&ring->first, __ATOMIC_RELAXED) == __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE))
        return 0;
    for (;;) {
        struct kvm_coalesced_mmio ent;
        pthread_mutex_lock(&v->vm->ring_lock);
        uint32_t first = __atomic_load_n(&ring->first, __ATOMIC_RELAXED);
        uint32_t last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);
        if (first == last) {
            pthread_mutex_unlock(&v->vm->ring_lock);
            return 0;
        }
        if (first >= v->ring_max || last >= v->ring_max) {
            pthread_mutex_unlock(&v->vm->ring_lock);
            return bad_run(ex, 3, first, last, v->ring_max);
        }
        memcpy(&ent, &ring->coalesced_mmio[first], sizeof(ent));
        __atomic_store_n(&ring->first, (first + 1) % v->ring_max, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&v->vm->ring_lock);

        uint32_t len = ent.len;
        if (len == 0 || len > sizeof(ent.data)) {
            count(v, VMK_COUNT_OTHER);
            continue; /* the kernel never writes these; drop rather than trust them */
        }
        memcpy(v->ring_data, ent.data, len);
        if (ent.pio) {
            if (ent.phys_addr <= 0xffff &&
                vmk_sink_serve(v->vm, (uint32_t)ent.phys_addr, 1, v->ring_data, len)) {
                count(v, VMK_COUNT_COALESCED_NATIVE);
                continue;
            }
            count(v, VMK_COUNT_COALESCED);
            int64_t code = to_python(v, ex, VMK_EXIT_PIO, ent.phys_addr & 0xffff, len, 1, 1, v->ring_data);
            if (code)
                return code;
        } else {
            count(v, VMK_COUNT_COALESCED);
            int64_t code = to_python(v, ex, VMK_EXIT_MMIO, ent.phys_addr, len, 1, 1, v->ring_data);
            if (code)
                return code;
        }
    }
}

static void copy_words(struct vmk_exit *ex, const void *src, uint32_t n, uint32_t start)
{
    if (n > VMK_EXIT_WORDS - start)
        n = VMK_EXIT_WORDS - start;
    memcpy(&ex->words[start], src, n * sizeof(uint64_t));
    ex->nwords = start + n;
}

/* Handle the exit in kvm_run. Returns 0 if it was served natively (re-enter the guest),
 * else the code for the caller. */
static int64_t handle_exit(struct vmk_vcpu *v, struct vmk_exit *ex)
{
    struct kvm_run *run = v->run;
    uint32_t reason = run->exit_reason;
    ex->kvm_reason = reason;
    ex->nwords = 0;
    switch (reason) {
    case KVM_EXIT_IO: {
        uint32_t size = run->io.size;
        uint32_t n = run->io.count;
        uint64_t off = run->io.data_offset;
        if (!vmk_io_in_bounds(v->run_size, size, n, off))
            return bad_run(ex, 1, size, n, off);
        uint8_t *data = (uint8_t *)run + off;
        int is_write = run->io.direction == KVM_EXIT_IO_OUT;
        if (vmk_sink_serve(v->vm, run->io.port, is_write, data, (size_t)size * n)) {
            count(v, VMK_COUNT_IO_NATIVE);
            return 0;
        }
        count(v, VMK_COUNT_IO);
        return to_python(v, ex, VMK_EXIT_PIO, run->io.port, size, n, is_write, data);
    }
    case KVM_EXIT_MMIO: {
        uint32_t len = run->mmio.len;
        if (len == 0 || len > sizeof(run->mmio.data))
            return bad_run(ex, 2, len, 0, 0);
        count(v, VMK_COUNT_MMIO);
        return to_python(v, ex, VMK_EXIT_MMIO, run->mmio.phys_addr, len, 1, run->mmio.is_write,
                         run->mmio.data);
    }
    case KVM_EXIT_HLT:
        count(v, VMK_COUNT_HLT);
        ex->code = VMK_EXIT_HLT;
        return VMK_EXIT_HLT;
    case KVM_EXIT_SHUTDOWN:
        count(v, VMK_COUNT_SHUTDOWN);
        ex->code = VMK_EXIT_SHUTDOWN;
        return VMK_EXIT_SHUTDOWN;
    case KVM_EXIT_SYSTEM_EVENT: {
        count(v, VMK_COUNT_SYSTEM_EVENT);
        ex->code = VMK_EXIT_SYSTEM_EVENT;
        ex->words[0] = run->system_event.type;
        uint32_t nd = run->system_event.ndata;
        if (nd > 16)
            nd = 16;
        copy_words(ex, run->system_event.data, nd, 1);
        return VMK_EXIT_SYSTEM_EVENT;
    }
    case KVM_EXIT_INTERNAL_ERROR: {
        count(v, VMK_COUNT_INTERNAL_ERROR);
        ex->code = VMK_EXIT_INTERNAL_ERROR;
        ex->words[0] = run->internal.suberror;
        uint32_t nd = run->internal.ndata;
        if (nd > 16)
            nd = 16;
        copy_words(ex, run->internal.data, nd, 1);
        return VMK_EXIT_INTERNAL_ERROR;
    }
    case KVM_EXIT_FAIL_ENTRY:
        count(v, VMK_COUNT_FAIL_ENTRY);
        ex->code = VMK_EXIT_FAIL_ENTRY;
        ex->words[0] = run->fail_entry.hardware_entry_failure_reason;
        ex->words[1] = run->fail_entry.cpu;
        ex->nwords = 2;
        return VMK_EXIT_FAIL_ENTRY;
    case KVM_EXIT_DEBUG:
        count(v, VMK_COUNT_DEBUG);
        ex->code = VMK_EXIT_DEBUG;
#ifdef __x86_64__
        ex->words[0] = run->debug.arch.exception;
        ex->words[1] = run->debug.arch.pc;
        ex->words[2] = run->debug.arch.dr6;
        ex->words[3] = run->debug.arch.dr7;
        ex->nwords = 4;
#elif defined(__aarch64__)
        ex->words[0] = run->debug.arch.hsr;
        ex->words[1] = run->debug.arch.far;
        ex->nwords = 2;
#endif
        return VMK_EXIT_DEBUG;
    case KVM_EXIT_INTR:
        count(v, VMK_COUNT_INTR);
        if (__atomic_load_n(&v->kicked, __ATOMIC_SEQ_CST)) {
            ex->code = VMK_EXIT_INTERRUPTED;
            return VMK_EXIT_INTERRUPTED;
        }
        return 0;
#ifdef __aarch64__
    case KVM_EXIT_ARM_NISV:
        /* A data abort without a valid syndrome (KVM_CAP_ARM_NISV_TO_USER): nothing to decode. */
        count(v, VMK_COUNT_OTHER);
        ex->code = VMK_EXIT_UNKNOWN;
        ex->words[0] = run->arm_nisv.esr_iss;
        ex->words[1] = run->arm_nisv.fault_ipa;
        ex->nwords = 2;
        return VMK_EXIT_UNKNOWN;
#endif
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        count(v, VMK_COUNT_OTHER);
        return 0;
    default:
        count(v, VMK_COUNT_OTHER);
        ex->code = VMK_EXIT_UNKNOWN;
        ex->words[0] = run->hw.hardware_exit_reason;
        ex->nwords = 1;
        return VMK_EXIT_UNKNOWN;
    }
}

int64_t vmk_run(struct vmk_vcpu *v, struct vmk_exit *ex)
{
    int64_t code;
    if (v->read_len) {
        /* Complete the packed read Python answered in ex->buf (ones if it was not this ex). */
        if (ex == v->read_ex)
            memcpy(v->read_dst, ex->buf, v->read_len);
        else
            memset(v->read_dst, 0xff, v->read_len);
        v->read_len = 0;
    }
    vmk_unblock_kick_signal();
    __atomic_store_n(&v->tid, vmk_tid(), __ATOMIC_SEQ_CST);
    for (;;) {
        if (v->pending != PENDING_NONE) {
            /* Ring entries were written before the exit that brought us out: first. */
            code = drain_ring(v, ex);
            if (code)
                break;
            int pending = v->pending;
            v->pending = PENDING_NONE;
            if (pending == PENDING_EINTR) {
                count(v, VMK_COUNT_INTR);
                if (__atomic_load_n(&v->kicked, __ATOMIC_SEQ_CST)) {
                    ex->code = VMK_EXIT_INTERRUPTED;
                    code = VMK_EXIT_INTERRUPTED;
                    break;
                }
                continue; /* a stale signal from a kick that was already cleared */
            }
            code = handle_exit(v, ex);
            if (code)
                break;
            continue;
        }
        uint32_t asked = v->run->kvm_valid_regs;
        int r = ioctl(v->fd, KVM_RUN, 0);
        if (r < 0) {
            int e = errno;
            if (e != EINTR && e != EAGAIN) {
                code = -e;
                break;
            }
            v->pending = PENDING_EINTR;
        } else {
            v->pending = PENDING_EXIT;
        }
        v->synced = asked;
        v->sync_valid = asked != 0;
    }
    __atomic_store_n(&v->tid, 0, __ATOMIC_SEQ_CST);
    return code;
}

void vmk_vcpu_set_exit(struct vmk_vcpu *v, struct vmk_exit *ex) { v->exit = ex; }

int64_t vmk_vcpu_run(struct vmk_vcpu *v)
{
    if (!v->exit)
        return -EINVAL;
    return vmk_run(v, v->exit);
}

size_t vmk_kvm_run_size(void) { return sizeof(struct kvm_run); }

int vmk_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }

int vmk_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }

uint32_t vmk_dirty_ring_harvest(void *ring, uint32_t entries, uint32_t *fetch,
                                uint32_t *slots, uint64_t *offsets, uint32_t max)
{
#ifdef KVM_DIRTY_GFN_F_DIRTY
    struct kvm_dirty_gfn *gfns = ring;
    uint32_t n = 0;

    if (entries == 0 || (entries & (entries - 1)) != 0)
        return 0;
    while (n < max) {
        struct kvm_dirty_gfn *e = &gfns[*fetch & (entries - 1)];
        uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
        if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
            break;
        slots[n] = e->slot;
        offsets[n] = e->offset;
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        (*fetch)++;
        n++;
    }
    return n;
#else
    return 0; /* headers without the dirty ring (before Linux 5.11) */
#endif
}

uint32_t vmk_dirty_ring_resync(void *ring, uint32_t entries, uint32_t *fetch)
{
#ifdef KVM_DIRTY_GFN_F_DIRTY
    struct kvm_dirty_gfn *gfns = ring;
    uint32_t ahead, i;

    if (entries == 0 || (entries & (entries - 1)) != 0)
        return 0;
    for (ahead = 0; ahead < entries; ahead++) {
        uint32_t flags = __atomic_load_n(&gfns[(*fetch + ahead) & (entries - 1)].flags, __ATOMIC_ACQUIRE);
        if (flags & KVM_DIRTY_GFN_F_DIRTY)
            break;
    }
    if (ahead == 0 || ahead == entries)
        return 0;
    /* Only entries still invalid (0) are stepped over: on a consistent ring a DIRTY entry ahead
     * means the ones before it are DIRTY too (KVM sets them in order), so the exchange fails and
     * nothing is skipped. */
    for (i = 0; i < ahead; i++) {
        uint32_t expected = 0;
        if (!__atomic_compare_exchange_n(&gfns[(*fetch + i) & (entries - 1)].flags, &expected,
                                         KVM_DIRTY_GFN_F_RESET, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            break;
    }
    *fetch += i;
    return i;
#else
    return 0;
#endif
}
