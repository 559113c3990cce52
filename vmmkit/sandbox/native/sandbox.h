/* vmmkit's sandbox helpers in C: what must be async-signal-safe (the SIGSYS report) and the
 * system calls Python has no wrapper for (Landlock, PR_SET_NO_NEW_PRIVS, PR_GET_SECCOMP). */
#ifndef VMMKIT_SANDBOX_H
#define VMMKIT_SANDBOX_H

#include <stddef.h>
#include <stdint.h>

int vmmkit_sigsys_install(const char *const *names, size_t count);
int vmmkit_thread_name(const char *name);
int vmmkit_no_new_privs(void);
int vmmkit_seccomp_install(const void *program, size_t bytes);
int vmmkit_seccomp_mode(void);
long vmmkit_landlock_abi(void);
long vmmkit_landlock_create(uint64_t handled_fs);
long vmmkit_landlock_add_path(int ruleset, int parent_fd, uint64_t allowed);
long vmmkit_landlock_restrict(int ruleset);

#endif
