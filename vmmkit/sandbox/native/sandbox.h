/* vmmkit's sandbox helpers in C: what must be async-signal-safe (the SIGSYS report) and the
 * system calls Python has no wrapper for (Landlock, PR_SET_NO_NEW_PRIVS, PR_GET_SECCOMP). */
#ifndef VMMKIT_SANDBOX_H
#define VMMKIT_SANDBOX_H

#include <stddef.h>
#include <stdint.h>

const char *vmmkit_scmp_load(void);
void *vmmkit_scmp_init(uint32_t default_action);
void vmmkit_scmp_release(void *ctx);
int vmmkit_scmp_resolve_name(const char *name);
int vmmkit_scmp_priority(void *ctx, int nr, uint8_t priority);
int vmmkit_scmp_export(void *ctx, int fd);
int vmmkit_scmp_rule(void *ctx, uint32_t action, int nr, int compare, unsigned int arg, int op,
                     uint64_t datum_a, uint64_t datum_b);
int vmmkit_sigsys_install(void);
const char *vmmkit_syscall_name(int nr);
int vmmkit_thread_name(const char *name);
int vmmkit_no_new_privs(void);
int vmmkit_seccomp_install(const void *program, size_t bytes);
int vmmkit_seccomp_mode(void);
long vmmkit_landlock_abi(void);
long vmmkit_landlock_create(uint64_t handled_fs);
long vmmkit_landlock_add_path(int ruleset, int parent_fd, uint64_t allowed);
long vmmkit_landlock_restrict(int ruleset);

#endif
