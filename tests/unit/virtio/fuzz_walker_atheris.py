"""Coverage-guided fuzzing of the virtqueue chain walkers with atheris (libFuzzer).

Each input is decoded into a hostile descriptor table (walker_cases.generate) laid out in
guard-paged guest memory; the C walker must agree with the Python reference and hand out
only guest RAM. Coverage comes from the instrumented Python walker (the reference follows
the same branches as the C). Run it for as long as you like::

    pip install atheris
    python tests/unit/virtio/fuzz_walker_atheris.py -max_total_time=600 [corpus_dir]

``test_native_sanitizers.py`` runs it for a few seconds when atheris is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["vmmkit.virtio.chain", "walker_cases"]):
    from vq_driver import guarded_memory
    from walker_cases import LAYOUT, compare, generate


class FuzzedSource:
    def __init__(self, data: bytes) -> None:
        self._fdp = atheris.FuzzedDataProvider(data)

    def integer(self, low: int, high: int) -> int:
        return int(self._fdp.ConsumeIntInRange(low, high))


def main() -> None:
    with guarded_memory(LAYOUT) as memory:

        def test_one_input(data: bytes) -> None:
            compare(memory, generate(FuzzedSource(data)))

        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
