"""Receiving a VM (``vm.receive-migration``), as Cloud Hypervisor's
``Vmm::receive_migration`` (``vmm/src/lib.rs``) does: one sender, requests answered in
order; the VM is built only when its state has arrived and resumed only on COMPLETE.

Nothing runs before COMPLETE: a sender that goes away, abandons, or sends anything malformed
or out of order (RAM outside the announced ranges, a state before RAM, an fd on TCP) gets an
Error answer if it still listens, and everything received is dropped: the caller is left
with no VM, as before.
"""

from __future__ import annotations

import mmap
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmmkit.errors import VmmError
from vmmkit.log import get_logger
from vmmkit.memory import PAGE_SIZE, GuestMemory, GuestRegion, MemoryRange, map_region
from vmmkit.migration import protocol
from vmmkit.migration.protocol import Command, MigrationError, ProtocolError
from vmmkit.state import StateError, field, int_field

if TYPE_CHECKING:
    from vmmkit.arch import MemoryLayout
    from vmmkit.config import VmConfig
    from vmmkit.machine import Machine
    from vmmkit.snapshot import SnapshotImage

log = get_logger()

#: Seconds the receiver waits for the sender's next bytes before it gives up.
IO_TIMEOUT = 60.0

#: Builds the received VM (paused, its state restored) from its configuration, state and RAM;
#: owns ``memory`` from the call on.
BuildVm = Callable[["VmConfig", "SnapshotImage", GuestMemory], "Machine"]
#: Checks the announced RAM ranges against the layout this vmmkit builds for the configuration,
#: and returns that layout.
CheckLayout = Callable[["VmConfig", str, list[MemoryRange]], "MemoryLayout"]


class _Receiver:
    def __init__(self, sock: socket.socket, *, unix: bool, check_layout: CheckLayout, build: BuildVm,
                 source: str) -> None:
        self.sock = sock
        self.unix = unix
        self.check_layout = check_layout
        self.build = build
        self.source = source
        self.local: bool | None = None
        self.config: VmConfig | None = None
        self.ranges: dict[int, MemoryRange] = {}  #: slot -> range announced by CONFIG
        self.memory: GuestMemory | None = None
        self.machine: Machine | None = None

    def run(self) -> Machine:
        try:
            while True:
                command, length, fds = protocol.read_request(self.sock, allow_fds=self.unix)
                try:
                    if fds and command is not Command.MEMORY_FD:
                        raise ProtocolError(f"{command.name} carries file descriptors")
                    done = self.handle(command, length, fds)
                    fds = []
                except Exception as exc:
                    protocol.close_fds(fds)
                    self._answer(protocol.ERROR, str(exc))
                    raise
                self._answer(protocol.OK)
                if done:
                    assert self.machine is not None
                    return self.machine
        except BaseException as exc:
            self.discard()
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, MigrationError):
                raise MigrationError(f"the migration from {self.source} failed: {exc}") from None
            if isinstance(exc, OSError):
                raise MigrationError(f"the migration from {self.source} failed: {exc.strerror or exc}") from None
            raise MigrationError(f"the migration from {self.source} failed: {exc}") from exc

    def _answer(self, status: int, message: str = "") -> None:
        try:
            self.sock.sendall(protocol.pack_response(status, message))
        except OSError:
            if status == protocol.OK:
                raise

    def discard(self) -> None:
        """Drop what was received (the VM never ran)."""
        if self.machine is not None:
            self.machine = None  # the builder's owner tears it down
        elif self.memory is not None:
            self.memory.close()
        self.memory = None

    # -- requests --------------------------------------------------------------------------------

    def handle(self, command: Command, length: int, fds: list[int]) -> bool:
        """Carry out one request (its payload still on the stream); True after COMPLETE."""
        if self.local is None and command is not Command.START:
            raise ProtocolError(f"{command.name} before START")
        if command is Command.START:
            if self.local is not None:
                raise ProtocolError("a second START")
            local = protocol.check_start(protocol.read_json(self.sock, length, "START"))
            if local and not self.unix:
                raise ProtocolError("local migration needs a Unix socket (the memory goes as file descriptors)")
            self.local = local
        elif command is Command.CONFIG:
            self._config(protocol.read_json(self.sock, length, "CONFIG"))
        elif command is Command.MEMORY_FD:
            sizes = (protocol.MEMORY_FD_SIZE, protocol.MEMORY_FD_AT_SIZE)
            self._memory_fd(protocol.recv_exact(self.sock, length, "MEMORY_FD") if length in sizes
                            else _refuse(f"MEMORY_FD: {length} bytes, expected {protocol.MEMORY_FD_SIZE}"), fds)
        elif command is Command.MEMORY:
            self._memory(length)
        elif command is Command.STATE:
            self._state(protocol.read_json(self.sock, length, "STATE"))
        elif command is Command.COMPLETE:
            if self.machine is None:
                raise ProtocolError("COMPLETE before the VM's state was sent")
            self.machine.resume()
            log.info("migration.received", source=self.source, local=self.local)
            return True
        elif command is Command.ABANDON:
            raise MigrationError("the sender abandoned the migration")
        return False

    def _config(self, document: dict[str, Any]) -> None:
        from vmmkit.config import ConfigError, VmConfig

        if self.config is not None:
            raise ProtocolError("a second CONFIG")
        try:
            config = VmConfig.from_json(field(document, "config", dict, "CONFIG"))
            arch = field(document, "arch", str, "CONFIG")
            ranges: dict[int, MemoryRange] = {}
            files: dict[int, tuple[int, int]] = {}
            for entry in field(document, "memory", list, "CONFIG"):
                slot = int_field(entry, "slot", "CONFIG.memory", 0, 1 << 15)
                if "file_id" in entry:
                    file_id = field(entry, "file_id", list, "CONFIG.memory")
                    if len(file_id) != 2 or not all(type(part) is int for part in file_id):
                        raise StateError(f"CONFIG.memory: slot {slot}: file_id {file_id!r} is not [dev, inode]")
                    files[slot] = (file_id[0], file_id[1])
                rng = MemoryRange(int_field(entry, "start", "CONFIG.memory"), int_field(entry, "size", "CONFIG.memory"))
                if rng.size <= 0 or rng.size % PAGE_SIZE or rng.start % PAGE_SIZE or slot in ranges:
                    raise StateError(f"CONFIG.memory: slot {slot} {rng} is not page aligned or repeated")
                ranges[slot] = rng
        except (StateError, ConfigError) as exc:
            raise ProtocolError(str(exc)) from None
        layout = self.check_layout(config, arch, sorted(ranges.values(), key=lambda r: r.start))
        self.config, self.ranges = config, ranges
        if config.memory.zones and not self.local:  # each zone mapped as its configuration says
            from vmmkit.snapshot_zones import allocate_received
            from vmmkit.state import SnapshotError

            try:
                self.memory = allocate_received(config, layout, ranges, files)
            except SnapshotError as exc:
                raise ProtocolError(str(exc)) from None
            return
        self.memory = GuestMemory()
        if not self.local:
            mem = config.memory
            for slot, rng in sorted(self.ranges.items()):
                self.memory.add_region(map_region(rng, slot, shared=mem.shared, hugepages=mem.hugepages,
                                                  hugepage_size=mem.hugepage_size, thp=mem.thp,
                                                  mergeable=mem.mergeable, prefault=False))

    def _memory_fd(self, payload: bytes, fds: list[int]) -> None:
        if not self.local:
            raise ProtocolError("MEMORY_FD in a migration that is not local")
        if len(fds) != 1:
            raise ProtocolError(f"MEMORY_FD carries {len(fds)} file descriptors, expected 1")
        slot, start, size, offset = protocol.unpack_memory_fd(payload)
        assert self.memory is not None
        if self.ranges.get(slot) != MemoryRange(start, size):
            raise ProtocolError(f"MEMORY_FD: slot {slot} at {start:#x}+{size:#x} was not announced by CONFIG")
        if any(region.slot == slot for region in self.memory.regions):
            raise ProtocolError(f"MEMORY_FD: slot {slot} was sent twice")
        fd = fds.pop()
        try:
            if offset % mmap.ALLOCATIONGRANULARITY or os.fstat(fd).st_size < offset + size:
                raise ProtocolError(f"MEMORY_FD: the file of slot {slot} is shorter than {offset:#x}+{size:#x} "
                                    "bytes (or the offset is not page aligned)")
            buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except BaseException:
            os.close(fd)
            raise
        from vmmkit.memory import _ffi

        pin = _ffi().from_buffer(buffer)
        self.memory.add_region(GuestRegion(MemoryRange(start, size), buffer, int(_ffi().cast("uintptr_t", pin)),
                                           fd=fd, slot=slot, fd_offset=offset, pin=pin))

    def _memory(self, length: int) -> None:
        if self.memory is None or self.local:
            raise ProtocolError("MEMORY before CONFIG" if self.memory is None else "MEMORY in a local migration")
        if length > protocol.range_table_size(protocol.MAX_RANGES):
            raise ProtocolError(f"MEMORY: a table of {length} bytes")
        table = protocol.unpack_ranges(protocol.recv_exact(self.sock, length, "a MEMORY table"))
        for start, size in table:
            region = self.memory.find_region(start)
            if region is None or not region.range.contains(start, size) or size <= 0:
                raise ProtocolError(f"MEMORY: {start:#x}+{size:#x} is not inside the guest RAM CONFIG announced")
        for start, size in table:
            region, offset = self.memory.translate(start, size)
            with memoryview(region.buffer) as whole:
                protocol.recv_into_exact(self.sock, whole[offset : offset + size], f"RAM at {start:#x}")

    def _state(self, state: dict[str, Any]) -> None:
        from vmmkit.snapshot import SnapshotImage

        if self.config is None or self.memory is None or self.machine is not None:
            raise ProtocolError("STATE before CONFIG" if self.config is None else "a second STATE")
        missing = set(self.ranges) - {region.slot for region in self.memory.regions}
        if missing:
            raise ProtocolError(f"STATE before the memory of slots {sorted(missing)} was sent")
        image = SnapshotImage(Path(f"<migration from {self.source}>"), self.config, state, ())
        memory, self.memory = self.memory, None
        self.machine = self.build(self.config, image, memory)


def _refuse(message: str) -> bytes:
    raise ProtocolError(message)


def receive(sock: socket.socket, *, unix: bool, source: str, check_layout: CheckLayout, build: BuildVm) -> Machine:
    """Serve one sender on ``sock`` until COMPLETE; the machine ``build`` made, resumed.

    :raises MigrationError: the migration failed (the sender was told, if it still listens);
        a machine ``build`` made is the caller's to tear down (it never ran)."""
    return _Receiver(sock, unix=unix, check_layout=check_layout, build=build, source=source).run()


__all__ = ["BuildVm", "CheckLayout", "VmmError", "receive"]
