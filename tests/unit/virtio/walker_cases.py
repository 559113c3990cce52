"""Hostile descriptor tables for the C-vs-Python differential tests (hypothesis strategies, the
comparison, and the invariant that the C walker only hands out guest RAM).

Two generators of the same distribution: hypothesis strategies (:func:`cases`, which shrink
a failure to a readable example) and :func:`generate`, driven by any source of integers (a
seeded ``random.Random`` for high-volume runs, atheris' ``FuzzedDataProvider`` for
coverage-guided fuzzing). Shared by ``test_walker_differential.py``, the sanitizer run in
``test_native_sanitizers.py`` and the atheris harness ``fuzz_walker_atheris.py``.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, Protocol

from hypothesis import strategies as st

from vmmkit.memory import GuestMemory
from vmmkit.virtio import chain as vq
from vmmkit.virtio.chain import DescriptorChain, RegionTable, VirtqueueError

#: (gpa, size, readonly): two adjacent regions, a hole, one more, and a read-only one.
LAYOUT = [(0x0000, 0x4000, False), (0x4000, 0x2000, False), (0x10000, 0x2000, False), (0x20000, 0x1000, True)]
#: Where indirect tables are written: inside a region, across the adjacent boundary, at the
#: very end of a region, in the read-only region, in the hole.
TABLES = [0x2000, 0x3FE0, 0x5FC0, 0x11000, 0x20F00, 0x8000]
EDGES = [0x0, 0x10, 0x3FF0, 0x3FFF, 0x4000, 0x5FF0, 0x5FFF, 0x6000, 0x6010, 0xFFF0, 0x10000, 0x11FF0,
         0x11FFF, 0x12000, 0x20000, 0x20FF8, 0x21000, 2**63, 2**64 - 16, 2**64 - 1]
LENGTHS = [0, 1, 2, 15, 16, 17, 32, 48, 0x100, 0x1000, 0x1FFF, 0x2000, 0x4000, 0x6000, 0x8000_0000,
           0xFFFF_FFF0, 0xFFFF_FFFF]
DESC = struct.Struct("<QIHH")
NEXT, WRITE = vq.VIRTQ_DESC_F_NEXT, vq.VIRTQ_DESC_F_WRITE

SEQUENTIAL = -1  # a next index meaning "the following entry", as a correct driver chains them

u64 = st.integers(0, 2**64 - 1)
addresses = st.one_of(st.sampled_from(EDGES), st.sampled_from(TABLES), st.integers(0, 0x22000), u64)
lengths = st.one_of(st.sampled_from(LENGTHS), st.integers(0, 0x2100), st.integers(0, 2**32 - 1))
#: What a correct driver might write: a small buffer in (or just past the end of) RAM, chained on.
well_formed = st.tuples(
    st.one_of(st.integers(0, 0x5FFF), st.integers(0x10000, 0x11FFF), st.integers(0x20000, 0x20FFF)),
    st.integers(0, 0x800),
    st.sampled_from([1, 1, 3, 3, 0, 2, 4, 5]),
    st.just(SEQUENTIAL),
)
hostile = st.tuples(
    addresses,
    lengths,
    st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF)),
    st.one_of(st.just(SEQUENTIAL), st.integers(0, 17), st.integers(0, 0xFFFF)),
)
descriptor = st.one_of(well_formed, well_formed, hostile)


@functools.cache
def table(entries: int) -> st.SearchStrategy[list[tuple[int, int, int, int]]]:
    def chain_on(raw: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        return [(a, n, f, i + 1 if nx == SEQUENTIAL else nx) for i, (a, n, f, nx) in enumerate(raw)]

    return st.lists(descriptor, min_size=entries, max_size=entries).map(chain_on)


@st.composite
def cases(draw: Any) -> dict[str, Any]:
    """One walk: queue parameters, the main table, indirect tables, head, capacity."""
    valid_sizes = st.sampled_from([1, 2, 4, 8, 16])
    invalid_sizes = st.sampled_from([0, 3, 12, 32768, 65536, 2**32])
    size = draw(st.one_of(valid_sizes, valid_sizes, valid_sizes, invalid_sizes))
    good_tables = st.sampled_from([0x1000, 0x10000, 0x4000, 0x5F00])
    desc_gpa = draw(st.one_of(good_tables, good_tables, good_tables, addresses))
    entries = min(size, 16)
    main = draw(table(entries)) if 0 < size <= 16 else []
    if draw(st.integers(0, 7)) == 0:
        main = make_ring(main, draw(st.sampled_from([NEXT, NEXT | WRITE])))
    indirect = []
    for base in draw(st.lists(st.sampled_from(TABLES), max_size=3, unique=True)):
        count = draw(st.integers(1, 6))
        entries_ = draw(table(count))
        if draw(st.integers(0, 7)) == 0:
            entries_ = make_ring(entries_, draw(st.sampled_from([NEXT, NEXT | WRITE])))
        indirect.append((base, entries_))
    return {
        "size": size,
        "desc_gpa": desc_gpa,
        "main": main,
        "indirect_tables": indirect,
        "head": draw(st.one_of(*[st.integers(0, max(entries - 1, 0))] * 7, st.integers(-1, 2**33))),
        "indirect": draw(st.booleans()),
        "capacity": draw(st.sampled_from([0, 1, 2, 3, 5, 8, 1024])),
    }


def make_ring(entries: list[tuple[int, int, int, int]], flags: int) -> list[tuple[int, int, int, int]]:
    """The same buffers chained into a cycle of one direction: a loop the walker must end."""
    return [(a, n, flags, (i + 1) % len(entries)) for i, (a, n, _, _) in enumerate(entries)]


class Source(Protocol):
    def integer(self, low: int, high: int) -> int:
        """A number in ``[low, high]``."""
        ...


class RandomSource:
    def __init__(self, seed: int) -> None:
        import random

        self._rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)


def _pick(src: Source, options: list[Any]) -> Any:
    return options[src.integer(0, len(options) - 1)]


def _address(src: Source) -> int:
    kind = src.integer(0, 3)
    if kind == 0:
        return int(_pick(src, EDGES))
    if kind == 1:
        return int(_pick(src, TABLES))
    return src.integer(0, 0x22000) if kind == 2 else src.integer(0, 2**64 - 1)


def _length(src: Source) -> int:
    kind = src.integer(0, 2)
    if kind == 0:
        return int(_pick(src, LENGTHS))
    return src.integer(0, 0x2100) if kind == 1 else src.integer(0, 2**32 - 1)


def _descriptor(src: Source, index: int) -> tuple[int, int, int, int]:
    if src.integer(0, 2) < 2:  # well formed
        base, size = _pick(src, [(0, 0x6000), (0x10000, 0x2000), (0x20000, 0x1000)])
        return (base + src.integer(0, size - 1), src.integer(0, 0x800), _pick(src, [1, 1, 3, 3, 0, 2, 4, 5]),
                index + 1)
    flags = src.integer(0, 7) if src.integer(0, 1) else src.integer(0, 0xFFFF)
    kind = src.integer(0, 2)
    next_ = index + 1 if kind == 0 else src.integer(0, 17) if kind == 1 else src.integer(0, 0xFFFF)
    return _address(src), _length(src), flags, next_


def generate(src: Source) -> dict[str, Any]:
    """The distribution of :func:`cases`, from any source of integers."""
    sizes = [1, 2, 4, 8, 16]
    size = int(_pick(src, sizes if src.integer(0, 5) else [0, 3, 12, 32768, 65536, 2**32]))
    desc_gpa = int(_pick(src, [0x1000, 0x10000, 0x4000, 0x5F00])) if src.integer(0, 3) else _address(src)
    entries = min(size, 16)
    main = [_descriptor(src, i) for i in range(entries)] if 0 < size <= 16 else []
    if src.integer(0, 7) == 0:
        main = make_ring(main, _pick(src, [NEXT, NEXT | WRITE]))
    indirect = []
    for base in TABLES:
        if src.integer(0, 3) == 0:
            entries_ = [_descriptor(src, i) for i in range(src.integer(1, 6))]
            if src.integer(0, 7) == 0:
                entries_ = make_ring(entries_, _pick(src, [NEXT, NEXT | WRITE]))
            indirect.append((base, entries_))
    head = src.integer(0, max(entries - 1, 0)) if src.integer(0, 7) else src.integer(-1, 2**33)
    return {
        "size": size, "desc_gpa": desc_gpa, "main": main, "indirect_tables": indirect, "head": head,
        "indirect": bool(src.integer(0, 1)), "capacity": int(_pick(src, [0, 1, 2, 3, 5, 8, 1024])),
    }


def write_case(memory: GuestMemory, case: dict[str, Any]) -> None:
    """Lay the case out in (zeroed) guest memory; parts that do not fit in RAM are skipped."""
    for region in memory.regions:
        memory.fill(region.start, region.size, 0)
    for base, entries in case["indirect_tables"]:
        _write_table(memory, base, entries)
    _write_table(memory, case["desc_gpa"], case["main"])  # last: it may overlap a table


def _write_table(memory: GuestMemory, base: int, entries: list[tuple[int, int, int, int]]) -> None:
    for i, (addr, length, flags, next_) in enumerate(entries):
        gpa = base + 16 * i
        if memory.is_valid(gpa, 16):
            memory.write(gpa, DESC.pack(addr, length, flags, next_))


Outcome = tuple[Any, ...]


def outcome(walk: Callable[[], DescriptorChain]) -> Outcome:
    try:
        chain = walk()
    except VirtqueueError as exc:
        return ("error", exc.kind)
    return ("ok", chain.head, chain.segments, chain.readable_count, chain.descriptors, chain.host_addresses)


def compare(memory: GuestMemory, case: dict[str, Any],
            native_walk: Callable[..., DescriptorChain] | None = None) -> Outcome:
    """Walk ``case`` with both walkers; assert they agree and that C stayed inside RAM."""
    write_case(memory, case)
    regions = RegionTable(memory)
    args = (regions, case["desc_gpa"], case["size"], case["head"])
    kwargs = {"indirect": case["indirect"], "capacity": case["capacity"]}
    expected = outcome(lambda: vq.walk_python(*args, **kwargs))
    got = outcome(lambda: (native_walk or vq.walk_native)(*args, **kwargs))
    assert got == expected, f"C walker {got} != Python walker {expected} for {case}"
    if got[0] == "ok":
        check_inside_ram(memory, got)
    return got


def check_inside_ram(memory: GuestMemory, result: Outcome) -> None:
    _, _, segments, readable, _, hosts = result
    for i, (segment, host) in enumerate(zip(segments, hosts, strict=True)):
        region = memory.find_region(segment.gpa)
        assert region is not None and segment.length > 0
        assert segment.gpa + segment.length <= region.range.end
        assert host == region.host_address + (segment.gpa - region.start)
        assert segment.writable == (i >= readable)
        assert not (segment.writable and region.readonly)
