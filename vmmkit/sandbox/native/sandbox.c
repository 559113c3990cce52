/* See sandbox.h. The SIGSYS handler is what Cloud Hypervisor's sigsys_handler does
 * (cloud-hypervisor/src/main.rs): report, then die of SIGSYS with the default action. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include "sandbox.h"

#ifndef SYS_SECCOMP
#define SYS_SECCOMP 1
#endif

static const char *const *syscall_names;
static size_t syscall_count;

static void put(const char *text)
{
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t done = write(STDERR_FILENO, text, len);
        if (done <= 0)
            return;
        text += done;
        len -= (size_t)done;
    }
}

static void put_number(long value)
{
    char digits[24];
    int at = (int)sizeof(digits) - 1;
    int negative = value < 0;
    unsigned long rest = negative ? (unsigned long)(-value) : (unsigned long)value;
    digits[at] = '\0';
    do {
        digits[--at] = (char)('0' + rest % 10);
        rest /= 10;
    } while (rest != 0 && at > 1);
    if (negative)
        digits[--at] = '-';
    put(&digits[at]);
}

static void on_sigsys(int signum, siginfo_t *info, void *context)
{
    char thread[17] = {0};
    (void)context;
    if (info->si_code == SYS_SECCOMP) {
        long nr = info->si_syscall;
        prctl(PR_GET_NAME, thread, 0, 0, 0);
        put("vmmkit: seccomp: thread '");
        put(thread);
        put("' made a forbidden system call: ");
        if (nr >= 0 && (size_t)nr < syscall_count && syscall_names[nr] != NULL)
            put(syscall_names[nr]);
        else
            put("?");
        put(" (");
        put_number(nr);
        put("); the VMM is stopped (--seccomp log logs instead)\n");
    }
    /* Die of the signal, as its default action would, and leave no core with guest RAM in it. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    struct sigaction fallback;
    memset(&fallback, 0, sizeof(fallback));
    fallback.sa_handler = SIG_DFL;
    sigaction(signum, &fallback, NULL);
    syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), signum);
}

/* libseccomp, loaded at run time (no headers or link-time dependency): the prototypes of
 * seccomp.h (libseccomp 2.5), resolved with dlsym. */
struct vmmkit_scmp_arg_cmp {
    unsigned int arg;
    int op;
    uint64_t datum_a;
    uint64_t datum_b;
};
static void *(*scmp_init)(uint32_t);
static void (*scmp_release)(void *);
static int (*scmp_rule_add_array)(void *, uint32_t, int, unsigned int, const struct vmmkit_scmp_arg_cmp *);
static int (*scmp_syscall_priority)(void *, int, uint8_t);
static int (*scmp_resolve_name)(const char *);
static char *(*scmp_resolve_num_arch)(uint32_t, int);
static int (*scmp_export_bpf)(const void *, int);
static char library_error[256];

const char *vmmkit_scmp_load(void)
{
    void *lib;
    if (scmp_init != NULL)
        return NULL;
    lib = dlopen("libseccomp.so.2", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        snprintf(library_error, sizeof(library_error), "%s", dlerror());
        return library_error;
    }
#define RESOLVE(var, symbol)                                                              \
    do {                                                                                  \
        *(void **)(&var) = dlsym(lib, symbol);                                            \
        if (var == NULL) {                                                                \
            snprintf(library_error, sizeof(library_error), "libseccomp.so.2 lacks %s", symbol); \
            return library_error;                                                         \
        }                                                                                 \
    } while (0)
    RESOLVE(scmp_release, "seccomp_release");
    RESOLVE(scmp_rule_add_array, "seccomp_rule_add_array");
    RESOLVE(scmp_syscall_priority, "seccomp_syscall_priority");
    RESOLVE(scmp_resolve_name, "seccomp_syscall_resolve_name");
    RESOLVE(scmp_resolve_num_arch, "seccomp_syscall_resolve_num_arch");
    RESOLVE(scmp_export_bpf, "seccomp_export_bpf");
    RESOLVE(scmp_init, "seccomp_init");
#undef RESOLVE
    return NULL;
}

void *vmmkit_scmp_init(uint32_t default_action) { return scmp_init(default_action); }
void vmmkit_scmp_release(void *ctx) { scmp_release(ctx); }
int vmmkit_scmp_resolve_name(const char *name) { return scmp_resolve_name(name); }
int vmmkit_scmp_priority(void *ctx, int nr, uint8_t priority) { return scmp_syscall_priority(ctx, nr, priority); }
int vmmkit_scmp_export(void *ctx, int fd) { return scmp_export_bpf(ctx, fd); }

int vmmkit_scmp_rule(void *ctx, uint32_t action, int nr, int compare, unsigned int arg, int op,
                     uint64_t datum_a, uint64_t datum_b)
{
    struct vmmkit_scmp_arg_cmp cmp = {.arg = arg, .op = op, .datum_a = datum_a, .datum_b = datum_b};
    return scmp_rule_add_array(ctx, action, nr, compare ? 1 : 0, compare ? &cmp : NULL);
}

#define VMMKIT_MAX_SYSCALL 1024

/* The SIGSYS report's table of names, made once from libseccomp's (it allocates; the handler
 * only reads). */
int vmmkit_sigsys_install(void)
{
    static const char *names[VMMKIT_MAX_SYSCALL];
    struct sigaction action;
    if (syscall_names == NULL) {
        for (int nr = 0; nr < VMMKIT_MAX_SYSCALL; nr++)
            names[nr] = scmp_resolve_num_arch(0, nr);
        syscall_names = names;
        syscall_count = VMMKIT_MAX_SYSCALL;
    }
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_sigsys;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGSYS, &action, NULL) == 0 ? 0 : -errno;
}

const char *vmmkit_syscall_name(int nr)
{
    if (syscall_names == NULL || nr < 0 || (size_t)nr >= syscall_count)
        return NULL;
    return syscall_names[nr];
}

int vmmkit_thread_name(const char *name)
{
    return prctl(PR_SET_NAME, name, 0, 0, 0) == 0 ? 0 : -errno;
}

int vmmkit_no_new_privs(void)
{
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 ? 0 : -errno;
}

int vmmkit_seccomp_install(const void *program, size_t bytes)
{
    struct sock_fprog fprog;
    fprog.len = (unsigned short)(bytes / sizeof(struct sock_filter));
    fprog.filter = (struct sock_filter *)program;
    if (bytes == 0 || bytes % sizeof(struct sock_filter) != 0 || bytes / sizeof(struct sock_filter) > BPF_MAXINSNS)
        return -EINVAL;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -errno;
    return syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) == 0 ? 0 : -errno;
}

int vmmkit_seccomp_mode(void)
{
    int mode = prctl(PR_GET_SECCOMP, 0, 0, 0, 0);
    return mode >= 0 ? mode : -errno;
}

/* Landlock (Documentation/userspace-api/landlock.rst). The structs are spelt out here so that
 * the build does not depend on the age of the installed linux/landlock.h. */
struct vmmkit_landlock_ruleset_attr {
    uint64_t handled_access_fs;
};

struct vmmkit_landlock_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#define VMMKIT_LANDLOCK_CREATE_RULESET_VERSION (1U << 0)
#define VMMKIT_LANDLOCK_RULE_PATH_BENEATH 1

long vmmkit_landlock_abi(void)
{
    long abi = syscall(SYS_landlock_create_ruleset, NULL, 0, VMMKIT_LANDLOCK_CREATE_RULESET_VERSION);
    return abi >= 0 ? abi : -errno;
}

long vmmkit_landlock_create(uint64_t handled_fs)
{
    struct vmmkit_landlock_ruleset_attr attr = {.handled_access_fs = handled_fs};
    long fd = syscall(SYS_landlock_create_ruleset, &attr, sizeof(attr), 0);
    return fd >= 0 ? fd : -errno;
}

long vmmkit_landlock_add_path(int ruleset, int parent_fd, uint64_t allowed)
{
    struct vmmkit_landlock_path_beneath_attr attr = {.allowed_access = allowed, .parent_fd = parent_fd};
    long done = syscall(SYS_landlock_add_rule, ruleset, VMMKIT_LANDLOCK_RULE_PATH_BENEATH, &attr, 0);
    return done == 0 ? 0 : -errno;
}

long vmmkit_landlock_restrict(int ruleset)
{
    long done = syscall(SYS_landlock_restrict_self, ruleset, 0);
    return done == 0 ? 0 : -errno;
}
