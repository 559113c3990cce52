"""The C walker under AddressSanitizer and UndefinedBehaviorSanitizer, and under atheris.

The sanitizer test builds the same C as ``vmmkit.virtio._native`` with
``-fsanitize=address,undefined`` into a temporary module and runs the differential fuzz loop in
a child Python with libasan preloaded and ``PYTHONMALLOC=malloc`` (so the iovec arrays cffi
allocates get redzones): an overflow of the output arrays, a read outside the guard-paged guest
memory or undefined behaviour (overflowing shifts, misaligned loads) ends the child with a report.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def _libasan() -> str | None:
    if shutil.which("gcc") is None:
        return None
    found = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = found.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{build!r}, {here!r}]
    import _vq_sanitized
    from vmmkit.virtio import chain as vq
    vq._ffi, vq._lib = _vq_sanitized.ffi, _vq_sanitized.lib  # the sanitized build, same API
    from vq_driver import guarded_memory
    from walker_cases import LAYOUT, RandomSource, compare, generate

    with guarded_memory(LAYOUT) as memory:
        source, runs, deadline = RandomSource({seed}), 0, time.monotonic() + {seconds}
        while time.monotonic() < deadline:
            compare(memory, generate(source))
            runs += 1
    print("cases", runs)
    """
)


@pytest.mark.skipif(_libasan() is None, reason="needs gcc with libasan (apt-get install gcc)")
def test_walker_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "vmmkit" / "virtio"))
    try:
        from _native_build import make_ffibuilder  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    builder = make_ffibuilder("_vq_sanitized", extra_compile_args=[*sanitize, "-O1", "-g"],
                              extra_link_args=sanitize, relative=False)
    builder.compile(tmpdir=str(tmp_path), verbose=False)
    env = {
        **os.environ,
        "LD_PRELOAD": _libasan() or "",
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=66",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=67",
    }
    script = CHILD.format(build=str(tmp_path), here=str(HERE), seed=1234, seconds=2)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    runs = int(result.stdout.split()[-1])
    assert runs > 500, result.stdout


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install atheris)")
def test_atheris_harness_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(HERE / "fuzz_walker_atheris.py"), "-max_total_time=2", "-seed=1",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-8000:]
    assert "Done" in result.stderr
