"""The seccomp allow lists: which system calls each kind of vmmkit thread may make.

Cloud Hypervisor keeps one list per thread kind (``vmm/src/seccomp_filters.rs``); so does
vmmkit, with one difference that Python imposes: every thread runs the interpreter, which may
import a module, collect garbage (closing files, unmapping memory), format a traceback (reading
source files) or log at any time, so :data:`RUNTIME` is allowed everywhere. What each kind adds
is what its own work needs. The lists were derived from ``strace -f`` of the test suite and of
the Linux tier and completed with ``--seccomp log`` runs (``scripts/seccomp-measure.py``; see
``docs/seccomp.md``).

Names are the kernel's (x86-64 and AArch64); a name the running architecture lacks (``open``
on AArch64) is skipped. A filtered thread passes its filter on to the threads it starts, and
a thread's effective filter is the intersection of its own and its creator's: so a kind that
starts threads of another kind (the API thread builds and boots VMs, a vCPU activates a virtio
device whose workers start then) allows what those need too (:func:`allowed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

#: Thread kinds (Cloud Hypervisor's: vmm, api, signal handler, vcpu, virtio device threads).
VMM: Final = "vmm"  # the main thread once set up (it handles signals), the control thread
API: Final = "api"  # the API server and its connections (they create, boot and hot-plug)
VCPU: Final = "vcpu"
EVENT_LOOP: Final = "event-loop"
DEVICE: Final = "device"  # device workers and device timers
KINDS: Final = (VMM, API, VCPU, EVENT_LOOP, DEVICE)

#: What the interpreter and glibc need on any thread.
RUNTIME: Final = frozenset({
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "membarrier",
    # threads, locks, time (threads are created with clone(CLONE_THREAD); see seccomp.py)
    "futex", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
    "sched_getaffinity", "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep",
    "gettimeofday", "time", "exit", "exit_group", "restart_syscall",
    # identity (logging, getpass, os.getpid)
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "uname",
    # signals: Python's handlers, pthread_kill (vCPU kicks), the SIGSYS report
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "tgkill",
    # files the interpreter reads: imports, tracebacks, log output (Landlock narrows them)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "close", "openat", "open",
    "lseek", "fstat", "newfstatat", "stat", "lstat", "statx", "fstatfs", "statfs", "access",
    "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "getcwd", "fcntl", "dup",
    "dup3", "ioctl", "getrandom", "poll", "ppoll", "select", "pselect6",
    # a thread installs its own filter (stacked on its creator's) and Landlock domain
    "seccomp", "landlock_restrict_self",
})

#: Device work: guest I/O on files, taps and eventfds, wherever device code runs.
DEVICE_IO: Final = frozenset({
    "preadv", "pwritev", "preadv2", "pwritev2", "fsync", "fdatasync", "fallocate", "ftruncate",
    "eventfd2", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "pipe2",
    "recvfrom", "sendto", "recvmsg", "sendmsg", "accept4", "accept", "shutdown", "getsockopt",
    "setsockopt", "getsockname", "getpeername", "timerfd_create", "timerfd_settime",
    "timerfd_gettime", "close_range",
})

#: Building, booting, resetting and hot-plugging a VM (the API and control threads do it).
SETUP: Final = frozenset({
    "memfd_create", "mlock", "munlock", "mincore", "msync", "socket", "bind", "listen", "connect",
    "socketpair", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
    "umask", "fchmod", "utimensat", "truncate", "prlimit64", "getrusage", "sysinfo", "kill",
    "sched_setaffinity", "landlock_create_ruleset", "landlock_add_rule", "wait4",
})

_OWN: Final[Mapping[str, frozenset[str]]] = {
    DEVICE: DEVICE_IO,
    VCPU: DEVICE_IO,  # MMIO and port handlers are device code, and activate virtio devices
    EVENT_LOOP: DEVICE_IO,
    API: DEVICE_IO | SETUP,
    VMM: DEVICE_IO | SETUP,
}

#: Kinds whose threads may start threads of another kind, hence allow what those need.
_STARTS: Final[Mapping[str, tuple[str, ...]]] = {
    VCPU: (DEVICE,),
    EVENT_LOOP: (DEVICE,),
    API: (VCPU, EVENT_LOOP, DEVICE, VMM),
    VMM: (VCPU, EVENT_LOOP, DEVICE, API),
}


def allowed(kind: str, extra: Mapping[str, Iterable[str]] | None = None) -> frozenset[str]:
    """The system calls a thread of ``kind`` may make: the runtime's, its own, those of the
    kinds it starts, and ``extra[k]`` (plugins' declarations) for each of those kinds."""
    if kind not in _OWN:
        raise ValueError(f"unknown thread kind {kind!r} (kinds: {', '.join(KINDS)})")
    extra = extra or {}
    names = set(RUNTIME)
    for each in (kind, *_STARTS.get(kind, ())):
        names |= _OWN[each]
        names |= set(extra.get(each, ()))
    return frozenset(names)


#: Never allowed, whatever a plugin declares: what turns a compromised VMM into a host
#: compromise (new programs, other processes' memory, mounts, kernel modules, privileges).
FORBIDDEN: Final = frozenset({
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "init_module",
    "finit_module", "delete_module", "kexec_load", "kexec_file_load", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "reboot", "swapon", "swapoff", "setuid", "setgid",
    "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "capset", "personality",
    "userfaultfd", "iopl", "ioperm", "open_by_handle_at", "acct", "settimeofday",
    "clock_settime", "adjtimex", "sethostname", "setdomainname", "io_uring_setup",
})
