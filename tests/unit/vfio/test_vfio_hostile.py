"""What the guest controls is hostile: random configuration cycles and BAR accesses (sizes,
offsets, values, including MSI/MSI-X programming and BAR moves) against passed-through
functions never raise into the vCPU and never corrupt what must stay read-only. A simulated
``/dev/vfio`` (contract test); the guest side is the real device manager and buses."""

from __future__ import annotations

import random

from vfio_support import Lab, edu_like, io_like, nvme_like

from vmmkit.pci import config as c


def test_random_guest_accesses_never_crash_the_vmm(lab: Lab) -> None:
    placed = [lab.place(lab.add(make()), name) for make, name in ((nvme_like, "nvme"), (edu_like, "edu"),
                                                                  (io_like, "io"))]
    slots = [int(p.properties["slot"]) for p in placed]
    identity = {slot: (lab.machine.guest.function(slot).read32(0), lab.machine.guest.function(slot).read32(8))
                for slot in slots}
    root = lab.machine.pci_segment()
    rng = random.Random(19)
    for _ in range(6000):
        slot = rng.choice(slots)
        function = root.functions[slot]
        offset = rng.randrange(-8, 0x110)
        size = rng.choice((0, 1, 2, 3, 4, 8))
        value = rng.getrandbits(32)
        if rng.random() < 0.5:
            function.config_write(offset, size, value)
            root.remap(function)
        else:
            function.config_read(offset, size)
        index = rng.choice(list(function.config.bars) or [0])
        if index in function.config.bars:
            bar_size = function.config.bars[index].size
            at = rng.randrange(-4, bar_size + 16)
            length = rng.choice((1, 2, 3, 4, 8, 16))
            if rng.random() < 0.5:
                function.bar_write(index, max(at, 0), rng.randbytes(length))
            else:
                assert len(function.bar_read(index, max(at, 0), length)) == length
    for slot in slots:
        guest = lab.machine.guest.function(slot)
        assert (guest.read32(0), guest.read32(8)) == identity[slot]
        assert guest.read8(c.HEADER_TYPE) == 0
    for p in placed:
        lab.machine.remove(p.id)
    assert lab.sim.open_groups == set() and lab.sim.containers == set()
    assert lab.machine.vm.slots == {}  # type: ignore[attr-defined]
