"""Differential test against QEMU, the reference: one driver sequence, replayed on QEMU's
virtio-rng-pci (non-transitional) and on vmmkit's virtio-pci transport, must observe the same
things.

The sequence uses only what QEMU's monitor can do from outside a guest: port I/O (``i``/``o``,
so configuration mechanism #1 at 0xCF8/0xCFC), physical-memory reads (``xp``) and rings
preloaded with the ``loader`` device. Every access to the virtio structures goes through the
VIRTIO_PCI_CAP_PCI_CFG window in configuration space, as a driver that cannot map BARs would do
it (virtio 1.2, 4.1.4.9). QEMU runs with TCG and a BIOS that only halts, so nothing assigns
BARs or touches the device but this test. No /dev/kvm needed; skipped without
``qemu-system-x86_64``.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from pci_support import FakeDevice, FakeMachine, FakeVm, pci_size, virtio_request, wait_for

from vmmkit.memory import GuestMemory
from vmmkit.virtio.device import VIRTIO_F_VERSION_1, ActivationContext, VirtioInterruptType

pytestmark = pytest.mark.requires_qemu

SLOT = 3
DESC, AVAIL, USED, BUFFER = 0x10000, 0x11000, 0x12000, 0x20000
BUFFER_LEN = 16
QUEUE_SIZE = 4

# struct virtio_pci_common_cfg
DFSELECT, DF, GFSELECT, GF, MSIX, NUMQ, STATUS, CFGGEN = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESC, Q_AVAIL, Q_USED = 0x20, 0x28, 0x30


class Platform(Protocol):
    def outp(self, port: int, size: int, value: int) -> None: ...

    def inp(self, port: int, size: int) -> int: ...

    def peek(self, addr: int, size: int) -> int: ...


def ring_image() -> bytes:
    """DESC..BUFFER+BUFFER_LEN: one device-writable descriptor, made available."""
    image = bytearray(BUFFER + BUFFER_LEN - DESC)
    struct.pack_into("<QIHH", image, 0, BUFFER, BUFFER_LEN, 2, 0)
    struct.pack_into("<HHH", image, AVAIL - DESC, 0, 1, 0)
    return bytes(image)


class QemuPlatform:
    def __init__(self, tmp: Path) -> None:
        bios = bytearray(b"\xf4" * 0x10000)
        bios[0xFFF0:0xFFF4] = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back
        (tmp / "halt.bin").write_bytes(bios)
        (tmp / "rings.bin").write_bytes(ring_image())
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-bios", str(tmp / "halt.bin"),
             "-qmp", "stdio", "-display", "none", "-nodefaults", "-m", "64",
             "-object", "rng-random,id=rng0,filename=/dev/urandom",
             "-device", f"virtio-rng-pci,rng=rng0,disable-legacy=on,addr={SLOT:02x}.0",
             "-device", f"loader,file={tmp / 'rings.bin'},addr={DESC:#x},force-raw=on"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._receive()  # greeting
        self._execute("qmp_capabilities")

    def _receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"QEMU exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def _execute(self, command: str, **arguments: Any) -> Any:
        assert self.proc.stdin is not None
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._receive()
        if "error" in reply:
            raise RuntimeError(f"QEMU: {reply['error']}")
        return reply["return"]

    def _hmp(self, line: str) -> str:
        return str(self._execute("human-monitor-command", **{"command-line": line}))

    def outp(self, port: int, size: int, value: int) -> None:
        self._hmp(f"o /{'bhw'[size.bit_length() - 1]} {port:#x} {value:#x}")

    def inp(self, port: int, size: int) -> int:
        return int(self._hmp(f"i /{'bhw'[size.bit_length() - 1]} {port:#x}").split("=")[1], 16)

    def peek(self, addr: int, size: int) -> int:
        unit = {1: "b", 2: "h", 4: "w", 8: "g"}[size]
        return int(self._hmp(f"xp /1x{unit} {addr:#x}").split(":")[1], 16)

    def close(self) -> None:
        try:
            self._execute("quit")
        except (RuntimeError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Rng(FakeDevice):
    """A virtio-rng as QEMU's: fills each writable buffer, interrupts when asked to."""

    def activate(self, ctx: ActivationContext) -> None:
        super().activate(ctx)
        queue, fd = ctx.queues[0], ctx.queue_events[0]

        def serve() -> None:
            import os

            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            while (chain := queue.pop()) is not None:
                queue.add_used(chain.head, chain.write(os.urandom(chain.writable_bytes)))
            if queue.needs_notification():
                ctx.interrupt.trigger(VirtioInterruptType.QUEUE, 0)

        ctx.event_loop.add_reader(fd, serve)


class VmmkitPlatform:
    def __init__(self, memory: GuestMemory) -> None:
        memory.write(DESC, ring_image())
        self.machine = FakeMachine(FakeVm(), memory)
        self.machine.event_loop.start()
        self.machine.place(Rng("rng0", sizes=(8,), offered=VIRTIO_F_VERSION_1),
                           virtio_request("rng0", pci_device_id=SLOT))
        self.cpu = self.machine.guest.cpu
        self.memory = memory

    def outp(self, port: int, size: int, value: int) -> None:
        self.cpu.pio_write(port, value.to_bytes(size, "little"))

    def inp(self, port: int, size: int) -> int:
        return int.from_bytes(self.cpu.pio_read(port, size), "little")

    def peek(self, addr: int, size: int) -> int:
        return self.memory.read_int(addr, size)

    def close(self) -> None:
        self.machine.close()


class ModernDriver:
    """Configuration mechanism #1 and the PCI_CFG window, as a driver would use them."""

    def __init__(self, platform: Platform) -> None:
        self.p = platform

    def cfg_read(self, reg: int, size: int) -> int:
        self.p.outp(0xCF8, 4, 0x8000_0000 | SLOT << 11 | reg & 0xFC)
        return self.p.inp(0xCFC + (reg & 3), size)

    def cfg_write(self, reg: int, size: int, value: int) -> None:
        self.p.outp(0xCF8, 4, 0x8000_0000 | SLOT << 11 | reg & 0xFC)
        self.p.outp(0xCFC + (reg & 3), size, value)

    def capabilities(self) -> Iterator[tuple[int, int]]:
        pos = self.cfg_read(0x34, 1)
        for _ in range(48):
            if pos < 0x40:
                return
            pos &= ~3
            yield pos, self.cfg_read(pos, 1)
            pos = self.cfg_read(pos + 1, 1)

    def probe(self) -> None:
        self.vendor_caps: dict[int, int] = {}
        self.msix_cap = 0
        for pos, cap_id in self.capabilities():
            if cap_id == 0x09:
                self.vendor_caps.setdefault(self.cfg_read(pos + 3, 1), pos)
            elif cap_id == 0x11:
                self.msix_cap = pos
        self.window = self.vendor_caps[5]  # VIRTIO_PCI_CAP_PCI_CFG
        common = self.vendor_caps[1]
        self.bar = self.cfg_read(common + 4, 1)
        self.offsets = {t: self.cfg_read(pos + 8, 4) for t, pos in self.vendor_caps.items()}

    def _select(self, offset: int, size: int) -> None:
        self.cfg_write(self.window + 4, 1, self.bar)
        self.cfg_write(self.window + 8, 4, offset)
        self.cfg_write(self.window + 12, 4, size)

    def bar_read(self, offset: int, size: int) -> int:
        self._select(offset, size)
        return self.cfg_read(self.window + 16, 4) & ((1 << (8 * size)) - 1)

    def bar_write(self, offset: int, size: int, value: int) -> None:
        self._select(offset, size)
        self.cfg_write(self.window + 16, 4, value)

    def r(self, field: int, size: int) -> int:
        return self.bar_read(self.offsets[1] + field, size)

    def w(self, field: int, size: int, value: int) -> None:
        self.bar_write(self.offsets[1] + field, size, value)


def observe(platform: Platform) -> dict[str, Any]:
    """Run the driver sequence; return what it saw."""
    d = ModernDriver(platform)
    seen: dict[str, Any] = {}
    seen["ids"] = hex(d.cfg_read(0, 4))
    seen["revision"] = d.cfg_read(8, 1)
    seen["class"] = hex(d.cfg_read(8, 4) >> 8)
    seen["header_type"] = d.cfg_read(0x0E, 1)
    seen["pin"] = d.cfg_read(0x3D, 1)
    seen["status_cap_list"] = bool(d.cfg_read(6, 2) & 0x10)
    d.cfg_write(0, 4, 0xFFFF_FFFF)
    d.cfg_write(8, 4, 0)
    after = hex(d.cfg_read(0, 4)), hex(d.cfg_read(8, 4) >> 8)
    seen["ids_read_only"] = after == (seen["ids"], seen["class"])
    d.cfg_write(0x3C, 2, 0xFF0B)
    seen["line_pin_after_write"] = hex(d.cfg_read(0x3C, 2))
    # BARs: Linux's sizing, then every cap's structure must fit the BAR it names
    sizes: dict[int, tuple[int, bool]] = {}
    reg = 0x10
    while reg < 0x28:
        low = d.cfg_read(reg, 4)
        d.cfg_write(reg, 4, 0xFFFF_FFFF)
        sz = d.cfg_read(reg, 4)
        d.cfg_write(reg, 4, low)
        mem64 = not low & 1 and low & 6 == 4
        if mem64:
            high = d.cfg_read(reg + 4, 4)
            d.cfg_write(reg + 4, 4, 0xFFFF_FFFF)
            sz |= d.cfg_read(reg + 4, 4) << 32
            d.cfg_write(reg + 4, 4, high)
        mask = 0xFFFF_FFFF_FFFF_FFF0 if mem64 else 0xFFFF_FFF0
        if sz:
            sizes[(reg - 0x10) // 4] = (pci_size(0, sz & mask, mask), bool(mem64))
        reg += 8 if mem64 else 4
    seen["bar_sizes_are_powers_of_two"] = all(s and not s & (s - 1) for s, _ in sizes.values())
    d.probe()
    seen["virtio_caps"] = sorted(d.vendor_caps)
    seen["virtio_bar"] = sizes.get(d.bar, (0, False))[1]  # a 64-bit memory BAR
    seen["structures_fit"] = all(
        d.cfg_read(pos + 8, 4) + d.cfg_read(pos + 12, 4) <= sizes[d.cfg_read(pos + 4, 1)][0]
        for t, pos in d.vendor_caps.items() if t != 5)
    seen["notify_multiplier"] = d.cfg_read(d.vendor_caps[2] + 16, 4)
    seen["common_length_ok"] = d.cfg_read(d.vendor_caps[1] + 12, 4) >= 0x38
    seen["msix_table_size"] = (d.cfg_read(d.msix_cap + 2, 2) & 0x7FF) + 1
    table = d.cfg_read(d.msix_cap + 4, 4)
    seen["msix_table_fits"] = (table & ~7) + 16 * seen["msix_table_size"] <= sizes[table & 7][0]
    d.cfg_write(d.msix_cap + 2, 2, 0x3FFF)
    control = d.cfg_read(d.msix_cap + 2, 2)
    seen["msix_control_read_only_bits"] = control & 0x3FFF == seen["msix_table_size"] - 1
    # the virtio status and feature protocol
    d.w(STATUS, 1, 0)
    seen["status_after_reset"] = d.r(STATUS, 1)
    d.w(DFSELECT, 4, 1)
    seen["version_1_offered"] = bool(d.r(DF, 4) & 1)
    d.w(STATUS, 1, 1)
    d.w(STATUS, 1, 3)
    seen["status_ack_driver"] = d.r(STATUS, 1)
    d.w(GFSELECT, 4, 1)
    d.w(GF, 4, 0)  # no VERSION_1
    d.w(STATUS, 1, 0xB)
    seen["features_ok_without_version_1"] = bool(d.r(STATUS, 1) & 8)
    d.w(STATUS, 1, 0)
    d.w(STATUS, 1, 1)
    d.w(STATUS, 1, 3)
    d.w(GFSELECT, 4, 0)
    d.w(GF, 4, 0)
    d.w(GFSELECT, 4, 1)
    d.w(GF, 4, 1)  # VERSION_1
    d.w(STATUS, 1, 0xB)
    seen["status_features_ok"] = d.r(STATUS, 1)
    seen["num_queues"] = d.r(NUMQ, 2)
    d.w(Q_SELECT, 2, 0)
    seen["queue_size_max"] = d.r(Q_SIZE, 2)
    d.w(Q_MSIX, 2, 5)
    seen["bad_vector_reads"] = hex(d.r(Q_MSIX, 2))
    d.w(Q_MSIX, 2, 0)
    seen["good_vector_reads"] = d.r(Q_MSIX, 2)
    d.w(Q_MSIX, 2, 0xFFFF)
    d.w(MSIX, 2, 9)
    seen["bad_config_vector_reads"] = hex(d.r(MSIX, 2))
    seen["notify_off"] = d.r(Q_NOFF, 2)
    d.w(Q_SIZE, 2, QUEUE_SIZE)
    seen["queue_size_set"] = d.r(Q_SIZE, 2)
    for field, address in ((Q_DESC, DESC), (Q_AVAIL, AVAIL), (Q_USED, USED)):
        d.w(field, 4, address)
        d.w(field + 4, 4, 0)
    seen["queue_desc_reads"] = hex(d.r(Q_DESC, 4))
    d.w(Q_ENABLE, 2, 1)
    seen["queue_enable"] = d.r(Q_ENABLE, 2)
    d.w(STATUS, 1, 0xF)
    seen["status_driver_ok"] = d.r(STATUS, 1)
    gen = d.r(CFGGEN, 1)
    seen["config_generation_stable"] = d.r(CFGGEN, 1) == gen
    # kick queue 0 through the notify structure, wait for the used ring
    d.bar_write(d.offsets[2] + seen["notify_off"] * seen["notify_multiplier"], 2, 0)
    seen["used_idx"] = wait_for(lambda: platform.peek(USED + 2, 2) == 1, timeout=10) and 1
    seen["used_elem"] = (platform.peek(USED + 4, 4), platform.peek(USED + 8, 4))
    seen["buffer_filled"] = platform.peek(BUFFER, 8) != 0 or platform.peek(BUFFER + 8, 8) != 0
    seen["isr_then_cleared"] = (d.bar_read(d.offsets[3], 1), d.bar_read(d.offsets[3], 1))
    d.w(STATUS, 1, 0)
    seen["after_reset"] = (d.r(STATUS, 1), d.r(Q_ENABLE, 2), d.r(Q_SIZE, 2), hex(d.r(Q_MSIX, 2)))
    return seen


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuPlatform]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("requires qemu-system-x86_64")
    platform = QemuPlatform(tmp_path)
    yield platform
    platform.close()


def test_same_observations_as_qemu(qemu: QemuPlatform, memory: GuestMemory) -> None:
    reference = observe(qemu)
    ours_platform = VmmkitPlatform(memory)
    try:
        ours = observe(ours_platform)
    finally:
        ours_platform.close()
    # sanity: the reference did what the spec says (so agreement means something)
    assert reference["used_idx"] == 1 and reference["buffer_filled"]
    assert reference["status_driver_ok"] == 0xF
    # The one deliberate difference: virtio 1.2 (6.1) lets a device refuse FEATURES_OK when
    # the driver did not accept VIRTIO_F_VERSION_1; vmmkit refuses (as its virtio-mmio
    # transport does), QEMU 7.2 accepts.
    assert (reference.pop("features_ok_without_version_1"), ours.pop("features_ok_without_version_1")) \
        == (True, False)
    # And the class code of an entropy device: QEMU uses class_id PCI_CLASS_OTHERS (0x00ff,
    # i.e. base class 0x00 "pre-2.0", subclass 0xff); vmmkit uses base class 0xff, "device
    # does not fit any defined class". Drivers bind by vendor/device ID, not class.
    assert (reference.pop("class"), ours.pop("class")) == ("0xff00", "0xff0000")
    differences = {key: (value, ours.get(key)) for key, value in reference.items() if value != ours.get(key)}
    assert not differences, f"QEMU vs vmmkit: {differences}"
