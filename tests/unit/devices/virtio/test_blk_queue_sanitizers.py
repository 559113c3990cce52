"""The plugin's C under AddressSanitizer and UndefinedBehaviorSanitizer: the virtio-blk data
path and queue (``native/blk_io.c``, ``native/blk_queue.c``) and the virtio-net queues
(``native/net_queue.c``).

Builds the plugin's C with ``-fsanitize=address,undefined`` into a temporary module (once for the
module's tests) and runs each device's hostile-ring differential loop (:mod:`blk_queue_cases`,
:mod:`net_queue_cases`) in a child Python with libasan preloaded and ``PYTHONMALLOC=malloc``:
guest memory sits between inaccessible pages, so an access outside it, an overflow of the
queue's arrays or undefined behaviour ends the child with a report.
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
    {setup}
    rng, runs, deadline = random.Random({seed}), 0, time.monotonic() + {seconds}
    while time.monotonic() < deadline:
        compare(generate(rng))
        runs += 1
    print("cases", runs)
    """
)

#: How each device's child swaps in the sanitized build (same API) and finds its cases.
SETUP = {
    "blk": """
from vmmkit_devices.virtio import blk_io
blk_io._ffi, blk_io._lib = _blk_sanitized.ffi, _blk_sanitized.lib
blk_io._load_walker()
assert blk_io.native_queue_available(), blk_io.NATIVE_QUEUE_UNAVAILABLE_REASON
from blk_queue_cases import compare, generate
""",
    "net": """
from vmmkit_devices.virtio import net_io
net_io.use(_blk_sanitized.ffi, _blk_sanitized.lib)
assert net_io.native_net_available(), net_io.NATIVE_NET_UNAVAILABLE_REASON
from net_queue_cases import compare, generate
""",
}


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The plugin's C module built with ASan and UBSan, as ``_blk_sanitized``."""
    if _libasan() is None:
        pytest.skip("needs gcc with libasan (apt-get install gcc)")
    folder = tmp_path_factory.mktemp("sanitized")
    sys.path.insert(0, str(BUILD))
    try:
        from _native_build import make_ffibuilder  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    builder = make_ffibuilder("_blk_sanitized", extra_compile_args=[*sanitize, "-O1", "-g"],
                              extra_link_args=sanitize, relative=False)
    builder.compile(tmpdir=str(folder), verbose=False)
    return folder


#: (device, seconds, cases at least): a net case waits for both sides to settle (0.06 s each),
#: so it runs longer for fewer cases.
@pytest.mark.parametrize(("device", "seconds", "minimum"), [("blk", 6, 20), ("net", 10, 8)])
def test_queues_under_address_and_undefined_behaviour_sanitizers(sanitized_build: Path, device: str, seconds: int,
                                                                 minimum: int) -> None:
    env = {
        **os.environ,
        "LD_PRELOAD": _libasan() or "",
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=66",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=67",
        "VMMKIT_BLK_IN_FLIGHT": "4",  # the pool's code too
    }
    script = CHILD.format(build=str(sanitized_build), here=str(HERE), seed=4321, seconds=seconds,
                          setup=SETUP[device].strip())
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    runs = int(result.stdout.split()[-1])
    assert runs >= minimum, result.stdout
