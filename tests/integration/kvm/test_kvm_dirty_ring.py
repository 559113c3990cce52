"""KVM's dirty ring (``vmmkit_kvm.dirty_ring``) against the bitmap, on real /dev/kvm: the same
guest writes give the same pages either way, a ring far smaller than the writes fills
(``KVM_EXIT_DIRTY_RING_FULL``) and the vCPU runs on with nothing lost, and the mode and size
choices are refused by name when they cannot be honoured."""

from __future__ import annotations

import pytest
from kvm_testlib import DONE_PORT
from vmmkit_kvm import dirty_ring
from vmmkit_kvm.bindings import Cap

from vmmkit.errors import CapabilityError, HypervisorError
from vmmkit.memory import GuestMemory, MemoryRange
from vmmkit.migration.dirty import dirty_pages

pytestmark = pytest.mark.requires_kvm

DONE = f"out %al, ${DONE_PORT:#x}\n hlt\n"
EXTRA = 0x40_0000  # 4 MiB, above the test RAM
PAGES = 2048  # 8 MiB of pages: eight times the smallest ring
PAGE = 0x1000

#: Writes to every third page of the region, some twice, one page with two stores.
SPARSE = f"""
    mov ${EXTRA:#x}, %rdi
    mov ${PAGES // 3}, %ecx
1:  movb $1, (%rdi)
    add ${3 * PAGE:#x}, %rdi
    dec %ecx
    jnz 1b
    mov ${EXTRA:#x}, %rdi
    movb $2, 0x10(%rdi)
    movl $3, {7 * PAGE + 8:#x}(%rdi)
    movb $4, {(PAGES - 1) * PAGE:#x}(%rdi)
""" + DONE

#: Writes to every even page of the region, stops at DONE, then to every odd page.
EVEN_PAGES = f"""
    mov ${EXTRA:#x}, %rdi
    mov ${PAGES // 2}, %ecx
1:  movb $1, (%rdi)
    add ${2 * PAGE:#x}, %rdi
    dec %ecx
    jnz 1b
    out %al, ${DONE_PORT:#x}
    mov ${EXTRA + PAGE:#x}, %rdi
    mov ${PAGES // 2}, %ecx
2:  movb $1, (%rdi)
    add ${2 * PAGE:#x}, %rdi
    dec %ecx
    jnz 2b
""" + DONE


@pytest.fixture
def ring_offered(kvm) -> None:
    if max(kvm.check_extension(Cap.DIRTY_LOG_RING), kvm.check_extension(Cap.DIRTY_LOG_RING_ACQ_REL)) <= 0:
        pytest.skip("this KVM offers no dirty ring")


@pytest.fixture
def extra_memory():
    memory = GuestMemory.allocate([MemoryRange(EXTRA, PAGES * PAGE)])
    yield memory
    memory.close()


def logged_pages(make_guest, extra_memory, source: str, *, callback: bool = False) -> tuple[object, set[int]]:
    """Run ``source`` with dirty logging on over a second slot; the guest and its pages logged."""
    guest = make_guest(source, callback=callback)
    guest.vm.add_memory_region(1, EXTRA, PAGES * PAGE, extra_memory.host_address(EXTRA, PAGES * PAGE))
    guest.vm.start_dirty_log()
    assert set(dirty_pages(guest.vm.get_dirty_log(1), PAGES)) == set()
    guest.run_to_done()
    pages = set(dirty_pages(guest.vm.get_dirty_log(1), PAGES))
    assert set(dirty_pages(guest.vm.get_dirty_log(1), PAGES)) == set()  # taken once
    guest.vm.stop_dirty_log()
    return guest, pages


def test_ring_and_bitmap_log_the_same_pages(make_guest, extra_memory, monkeypatch, ring_offered) -> None:
    expected = set(range(0, 3 * (PAGES // 3), 3)) | {7, PAGES - 1}
    seen = {}
    for mode in ("ring", "bitmap"):
        monkeypatch.setenv(dirty_ring.MODE_ENV, mode)
        guest, pages = logged_pages(make_guest, extra_memory, SPARSE)
        assert guest.vm.dirty_log_mode.split()[0] == mode
        seen[mode] = pages
    assert seen["ring"] == seen["bitmap"] == expected


def test_a_full_ring_exits_and_the_vcpu_runs_on_with_every_page_logged(make_guest, extra_memory,
                                                                       monkeypatch, callback, ring_offered) -> None:
    """1024 writes through a 256-entry ring: the vCPU exits with KVM_EXIT_DIRTY_RING_FULL, is
    harvested and runs on to the end; every written page is reported. Where KVM let the ring
    overflow (the nested kvm_pvm host does, see vmmkit_kvm.dirty_ring), the slot reports all of its
    pages (never fewer than were written); otherwise exactly the pages written."""
    monkeypatch.setenv(dirty_ring.MODE_ENV, "ring")
    monkeypatch.setenv(dirty_ring.ENTRIES_ENV, "256")  # a page of entries: the smallest KVM takes
    guest, pages = logged_pages(make_guest, extra_memory, EVEN_PAGES, callback=callback)
    rings = guest.vm.dirty_rings
    written = set(range(0, PAGES, 2))
    assert rings.entries == 256
    assert guest.vcpu.exit_counts()["dirty-ring-full"] >= 1
    assert rings.full_exits == guest.vcpu.exit_counts()["dirty-ring-full"]
    assert pages >= written
    assert pages == (set(range(PAGES)) if rings.overflows else written)
    overflows_before = rings.overflows
    # The rings stay in step with KVM after the run (and any overflow): the odd pages next.
    guest.vm.start_dirty_log()
    guest.ops.done.clear()
    guest.run_to_done()
    odd = set(dirty_pages(guest.vm.get_dirty_log(1), PAGES))
    assert odd == (set(range(PAGES)) if rings.overflows > overflows_before else set(range(1, PAGES, 2)))


def test_ring_counts_entries_and_bitmap_mode_has_no_rings(make_guest, monkeypatch) -> None:
    monkeypatch.setenv(dirty_ring.MODE_ENV, "bitmap")
    assert make_guest("hlt").vm.dirty_rings is None
    monkeypatch.setenv(dirty_ring.MODE_ENV, "auto")
    guest = make_guest("hlt")
    if guest.vm.capabilities["dirty_log_ring"] <= 0 and guest.vm.capabilities["dirty_log_ring_acq_rel"] <= 0:
        assert guest.vm.dirty_log_mode == "bitmap"
    else:
        assert guest.vm.dirty_log_mode.startswith("ring (")


@pytest.mark.parametrize(("name", "value", "message"), [
    (dirty_ring.MODE_ENV, "rings", "expected one of auto, ring, bitmap"),
    (dirty_ring.ENTRIES_ENV, "1000", "needs a power of two"),
    (dirty_ring.ENTRIES_ENV, "many", "not an integer"),
    (dirty_ring.ENTRIES_ENV, str(1 << 40), "needs a power of two"),
])
def test_a_mode_or_size_that_cannot_be_honoured_is_refused(kvm, monkeypatch, name, value, message,
                                                           ring_offered) -> None:
    monkeypatch.setenv(dirty_ring.MODE_ENV, "ring" if name == dirty_ring.ENTRIES_ENV else value)
    monkeypatch.setenv(name, value)
    vm = None
    with pytest.raises(CapabilityError, match=message):
        vm = kvm.create_vm("x86_64")
    assert vm is None


def test_a_ring_size_kvm_refuses_is_an_error_not_a_silent_bitmap(kvm, monkeypatch, ring_offered) -> None:
    monkeypatch.setenv(dirty_ring.MODE_ENV, "auto")
    monkeypatch.setenv(dirty_ring.ENTRIES_ENV, "64")  # 1 KiB: less than a page, which KVM refuses
    with pytest.raises(HypervisorError) as info:
        kvm.create_vm("x86_64")
    assert info.value.call == "KVM_ENABLE_CAP"
