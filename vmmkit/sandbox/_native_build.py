"""cffi build script for ``vmmkit.sandbox._native`` (out-of-line API mode): the SIGSYS report
and the Landlock and ``prctl`` calls Python has no wrapper for (``vmmkit/sandbox/native/``).

Built by ``setup.py`` (``cffi_modules``). libseccomp itself is loaded at run time through
cffi's ABI mode (:mod:`vmmkit.sandbox.seccomp`), so building needs no libseccomp headers.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

NATIVE = Path(__file__).resolve().parent / "native"

CDEF = r"""
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
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "vmmkit.sandbox._native",
    '#include "sandbox.h"',
    sources=[os.path.relpath(NATIVE / "sandbox.c")],
    include_dirs=[str(NATIVE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
