"""cffi build script for ``vmmkit_devices.virtio._native`` (out-of-line API mode): the
virtio-blk data path and queue in C (``native/blk_io.c``, ``native/blk_queue.c``) and the
virtio-net queues (``native/net_queue.c``).

Built by ``plugins/devices/setup.py`` (``cffi_modules``). :func:`make_ffibuilder` also serves
the tests, which may build a sanitizer variant of the same C under another module name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "native"

#: The headers whose declarations Python sees, in include order.
HEADERS = ("blk_io.h", "blk_queue.h", "net_queue.h")

#: What the headers take from the system (``<sys/uio.h>``).
SYSTEM_CDEF = r"""
struct iovec {
    void *iov_base;
    size_t iov_len;
    ...;
};
"""


def header_cdef(header: Path) -> str:
    """``header``'s declarations as cffi's ``cdef`` takes them, so that they are written once,
    in the header: comments and preprocessor lines dropped (``#if``/``#ifdef`` blocks with
    their contents, the include guard kept open), each object-like ``#define NAME value`` as
    ``#define NAME ...`` and each array size that is not a literal as ``[...]`` (the compiler
    fills both in, and cffi checks the rest of every struct against it).

    The same function is in ``vmmkit_kvm/_native_build.py``: a build script runs with only
    setuptools and cffi installed, so the two cannot share a module."""
    text = re.sub(r"/\*.*?\*/", " ", header.read_text(), flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out: list[str] = []
    depth = 0  # inside #if/#ifdef/#ifndef blocks other than the include guard
    guard = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if depth == 0:
                out.append(re.sub(r"\[([^\]\d][^\]]*)\]", "[...]", line))
            continue
        directive, _, rest = stripped[1:].strip().partition(" ")
        rest = rest.strip()
        if directive == "ifndef" and guard is None and not any(o.strip() for o in out):
            guard = rest
        elif directive in ("if", "ifdef", "ifndef"):
            depth += 1
        elif directive == "endif":
            depth = max(depth - 1, 0)
        elif directive == "define" and depth == 0:
            name, _, value = rest.partition(" ")
            if name != guard and "(" not in name and value.strip():
                out.append(f"#define {name} ...")
    return "\n".join(out)



def cdef() -> str:
    """The module's declarations: :data:`SYSTEM_CDEF`, then each of :data:`HEADERS`."""
    return SYSTEM_CDEF + "\n".join(header_cdef(NATIVE / name) for name in HEADERS)


CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-fno-strict-aliasing"]


def make_ffibuilder(
    module: str = "vmmkit_devices.virtio._native", *, extra_compile_args: Sequence[str] = (),
    extra_link_args: Sequence[str] = (), relative: bool = True,
) -> FFI:
    builder = FFI()
    builder.cdef(cdef())
    sources = [NATIVE / "blk_io.c", NATIVE / "blk_queue.c", NATIVE / "net_queue.c"]
    builder.set_source(
        module,
        '#include <sys/uio.h>\n#include "blk_io.h"\n#include "blk_queue.h"\n#include "net_queue.h"',
        # cffi wants the path relative to the directory setup.py runs in.
        sources=[os.path.relpath(source) if relative else str(source) for source in sources],
        include_dirs=[str(NATIVE)],
        extra_compile_args=[*CFLAGS, *extra_compile_args],
        extra_link_args=list(extra_link_args),
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
