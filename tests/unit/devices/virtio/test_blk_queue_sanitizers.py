"""The C virtio-blk data path and queue (``native/blk_io.c``, ``native/blk_queue.c``) under
AddressSanitizer and UndefinedBehaviorSanitizer.

Builds the plugin's C with ``-fsanitize=address,undefined`` into a temporary module and runs the
hostile-ring differential loop (:mod:`blk_queue_cases`) in a child Python with libasan preloaded
and ``PYTHONMALLOC=malloc``: guest memory sits between inaccessible pages, so an access outside
it, an overflow of the queue's arrays or undefined behaviour ends the child with a report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
BUILD = REPO / "plugins" / "devices" / "src" / "vmmkit_devices" / "virtio"


def _libasan() -> str | None:
    if shutil.which("gcc") is None:
        return None
    found = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = found.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


CHILD = textwrap.dedent(
    """
    import random, sys, time
    sys.path[:0] = [{build!r}, {here!r}]
    import _blk_sanitized
    from vmmkit_devices.virtio import blk_io
    blk_io._ffi, blk_io._lib = _blk_sanitized.ffi, _blk_sanitized.lib  # the sanitized build, same API
    blk_io._load_walker()
    assert blk_io.native_queue_available(), blk_io.NATIVE_QUEUE_UNAVAILABLE_REASON
    from blk_queue_cases import compare, generate

    rng, runs, deadline = random.Random({seed}), 0, time.monotonic() + {seconds}
    while time.monotonic() < deadline:
        compare(generate(rng))
        runs += 1
    print("cases", runs)
    """
)


@pytest.mark.skipif(_libasan() is None, reason="needs gcc with libasan (apt-get install gcc)")
def test_blk_queue_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    sys.path.insert(0, str(BUILD))
    try:
        from _native_build import make_ffibuilder  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    builder = make_ffibuilder("_blk_sanitized", extra_compile_args=[*sanitize, "-O1", "-g"],
                              extra_link_args=sanitize, relative=False)
    builder.compile(tmpdir=str(tmp_path), verbose=False)
    env = {
        **os.environ,
        "LD_PRELOAD": _libasan() or "",
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=66",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=67",
        "VMMKIT_BLK_IN_FLIGHT": "4",  # the pool's code too
    }
    script = CHILD.format(build=str(tmp_path), here=str(HERE), seed=4321, seconds=6)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    runs = int(result.stdout.split()[-1])
    assert runs >= 20, result.stdout
