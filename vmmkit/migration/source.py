"""Sending a VM (``vm.send-migration``): pre-copy, then stop-and-copy.

As Cloud Hypervisor's ``Vmm::send_migration`` (``vmm/src/lib.rs``): START, CONFIG, then guest
RAM while the guest runs: a first pass over all of it, then rounds of what the backend's dirty
log says the guest wrote again, until one round's dirty set is small enough to send within
``downtime_ms`` at the rate measured so far (or :data:`MAX_ROUNDS` rounds); then the VM is
paused, every block whose content differs from what was sent is sent (this catches writes the
VMM's own devices made, which no dirty log shows: :mod:`vmmkit.migration.dirty`), the state
follows (:func:`vmmkit.snapshot.collect_state`), and COMPLETE makes the destination resume.
With ``local`` (a Unix socket and ``--memory shared=on``) the memfds go by ``SCM_RIGHTS``
instead of the bytes, and the VM is paused for the state only.

A backend without a dirty log (:attr:`vmmkit.hypervisor.Vm.supports_dirty_log`) is paused
first and all RAM copied. Whatever fails (the destination refuses, dies, or a piece of the VM
cannot be saved), the source sends ABANDON if it still can, stops logging, and resumes the
VM if it paused it: it keeps running.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from attrs import frozen

from vmmkit import __version__
from vmmkit.log import get_logger
from vmmkit.migration import protocol
from vmmkit.migration.dirty import BLOCK, RegionLedger, dirty_blocks, runs
from vmmkit.migration.protocol import Command, MigrationError
from vmmkit.migration.transport import Endpoint, connect
from vmmkit.snapshot_zones import source_file_ids
from vmmkit.state import NotSnapshottable, is_snapshottable

if TYPE_CHECKING:
    from vmmkit.config import VmConfig
    from vmmkit.machine import Machine

log = get_logger()

#: Dirty-log rounds after the first pass before the VM is stopped whatever is left.
MAX_ROUNDS: Final = 8
#: Seconds any one send or answer may take before the migration is given up.
IO_TIMEOUT: Final = 60.0
#: Bytes of RAM in one MEMORY request at most (the receiver reads them into place).
_BATCH: Final = 32 << 20


@frozen
class SendReport:
    rounds: int
    bytes_sent: int
    total_s: float
    downtime_s: float


def check_migratable(machine: Machine) -> None:
    """Refuse before anything is sent when a piece of the VM cannot be saved.

    :raises NotSnapshottable: naming it."""
    assert machine.vm is not None
    if not is_snapshottable(machine.vm):
        raise NotSnapshottable(f"backend {type(machine.vm).__name__} cannot save its VM state")
    for placed in machine.devices:
        if not is_snapshottable(placed.device):
            raise NotSnapshottable(f"device {placed.id} ({placed.kind}) does not implement the snapshot "
                                   "contract (vmmkit.state.Snapshottable)")


class _Sender:
    def __init__(self, machine: Machine, sock: socket.socket) -> None:
        self.machine = machine
        self.sock = sock
        self.bytes_sent = 0

    def send_blocks(self, work: Mapping[RegionLedger, Sequence[int]]) -> None:
        """The blocks named, as MEMORY requests of at most :data:`_BATCH` bytes of RAM."""
        batch: list[tuple[RegionLedger, int, int]] = []
        size = 0
        for ledger, blocks in work.items():
            for first, count in runs(blocks):
                while count:
                    take = min(count, max(1, (_BATCH - size) // BLOCK))
                    batch.append((ledger, first, take))
                    size += take * BLOCK
                    first, count = first + take, count - take
                    if size >= _BATCH:
                        self._send_batch(batch)
                        batch, size = [], 0
        if batch:
            self._send_batch(batch)

    def _send_batch(self, batch: Sequence[tuple[RegionLedger, int, int]]) -> None:
        table = []
        for ledger, first, count in batch:
            offset, length = ledger.extent(first, count)
            table.append((ledger.region.start + offset, length))
        protocol.send_request(self.sock, Command.MEMORY, protocol.pack_ranges(table))
        for ledger, first, count in batch:
            data = ledger.snapshot(first, count)
            self.sock.sendall(data)
            self.bytes_sent += len(data)
        protocol.read_response(self.sock, "MEMORY")


def send(machine: Machine, config: VmConfig, endpoint: Endpoint, *, local: bool,
         downtime_ms: int = 300) -> SendReport:
    """Migrate ``machine`` (running or paused) to the receiver at ``endpoint``. On success the
    destination runs the VM and ``machine`` is paused for the caller to stop; on failure
    ``machine`` is as it was.

    :raises MigrationError: why it failed. :raises NotSnapshottable: a piece cannot be saved."""
    assert machine.vm is not None and machine.memory is not None and machine.hypervisor is not None
    from vmmkit.machine import MachineState
    from vmmkit.snapshot import collect_state

    check_migratable(machine)
    regions = machine.memory.regions
    if local:
        if endpoint.family != "unix":
            raise MigrationError("local=true hands guest RAM over a Unix socket: use a unix:<path> URL")
        unshared = [region.start for region in regions if region.fd is None]
        if unshared:
            raise MigrationError("local=true needs guest RAM in memfds (--memory shared=on) or in shared memory "
                                 "zones (shared=on for each --memory-zone); this VM's RAM at "
                                 + ", ".join(f"{start:#x}" for start in unshared) + " is private")
    started = time.monotonic()
    was_running = machine.state is MachineState.RUNNING
    vm = machine.vm
    paused_at: float | None = None
    logging = False
    try:
        sock = connect(endpoint, IO_TIMEOUT)
    except OSError as exc:
        raise MigrationError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    sender = _Sender(machine, sock)
    rounds = 0
    handed_over = False
    try:
        protocol.call(sock, Command.START, protocol.start_payload(__version__, local=local))
        files = source_file_ids(regions)  # a receiver on this host must not copy RAM into these
        protocol.call(sock, Command.CONFIG, protocol.encode_json({
            "config": config.to_json(), "arch": machine.arch_name, "hypervisor": machine.hypervisor.name,
            "memory": [{"slot": r.slot, "start": r.start, "size": r.size,
                        **({"file_id": list(files[r.slot])} if r.slot in files else {})} for r in regions]}))
        if local:
            for region in regions:
                assert region.fd is not None
                protocol.call(sock, Command.MEMORY_FD,
                              protocol.pack_memory_fd(region.slot, region.start, region.size, region.fd_offset),
                              fds=[region.fd])
            paused_at = _pause(machine, was_running)
        else:
            ledgers = [RegionLedger(region) for region in regions]
            if vm.supports_dirty_log:
                vm.start_dirty_log()
                logging = True
                pass_started = time.monotonic()
                sender.send_blocks({ledger: ledger.first_pass() for ledger in ledgers})
                rate = sender.bytes_sent / max(time.monotonic() - pass_started, 1e-3)
                for rounds in range(1, MAX_ROUNDS + 1):  # noqa: B007 (reported)
                    dirty = {ledger: sorted(dirty_blocks(vm.get_dirty_log(ledger.region.slot), ledger.region.size))
                             for ledger in ledgers}
                    pending = sum(len(blocks) for blocks in dirty.values()) * BLOCK
                    if pending / rate * 1000 <= downtime_ms:
                        break
                    before, round_started = sender.bytes_sent, time.monotonic()
                    sender.send_blocks(dirty)
                    rate = max(rate, (sender.bytes_sent - before) / max(time.monotonic() - round_started, 1e-3))
                paused_at = _pause(machine, was_running)
                vm.stop_dirty_log()
                logging = False
                # Once the devices are quiet, everything that differs from what was sent:
                # the guest's last writes and the VMM's own (device DMA), which no log shows.
                sender.send_blocks({ledger: ledger.changed() for ledger in ledgers})
            else:
                paused_at = _pause(machine, was_running)
                sender.send_blocks({ledger: ledger.first_pass() for ledger in ledgers})
        state = collect_state(machine)
        state["memory"] = [{"slot": r.slot, "start": r.start, "size": r.size} for r in regions]
        handed_over = True
        for placed in machine.devices:  # the destination builds the devices at STATE: disk locks
            placed.device.hand_over()
        protocol.call(sock, Command.STATE, protocol.encode_json(state))
        log.debug("migration.state_sent", after_pause_s=round(time.monotonic() - (paused_at or 0), 3))
        protocol.call(sock, Command.COMPLETE)
    except BaseException as exc:
        _abandon(sock)
        sock.close()  # the receiver drops its VM (and the disks it opened) on end of stream
        if handed_over:
            _take_back(machine)
        if logging:
            try:
                vm.stop_dirty_log()
            except Exception:
                log.exception("migration.stop_dirty_log_failed")
        if paused_at is not None and was_running and machine.state is MachineState.PAUSED:
            machine.resume()
        log.warning("migration.send_failed", destination=str(endpoint), error=str(exc))
        if isinstance(exc, NotSnapshottable) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, MigrationError):
            raise MigrationError(f"migration to {endpoint} failed: {exc}") from None
        if isinstance(exc, OSError):
            raise MigrationError(f"migration to {endpoint} failed: {exc.strerror or exc}") from None
        raise MigrationError(f"migration to {endpoint} failed: {exc}") from exc
    sock.close()
    now = time.monotonic()
    report = SendReport(rounds, sender.bytes_sent, now - started, now - (paused_at or now))
    log.info("migration.sent", destination=str(endpoint), local=local, rounds=report.rounds,
             bytes=report.bytes_sent, total_s=round(report.total_s, 3), downtime_s=round(report.downtime_s, 3))
    return report


def _pause(machine: Machine, was_running: bool) -> float:
    if was_running:
        machine.pause()
    return time.monotonic()


def _take_back(machine: Machine, patience: float = 5.0) -> None:
    """Every device takes back what it handed over; the receiver may still be closing the
    devices it built, so a refusal is retried for ``patience`` seconds, then logged (the VM
    goes on without that lock)."""
    from vmmkit.errors import DeviceError

    deadline = time.monotonic() + patience
    for placed in machine.devices:
        while True:
            try:
                placed.device.take_back()
                break
            except DeviceError as exc:
                if time.monotonic() >= deadline:
                    log.error("migration.take_back_failed", device=placed.id, error=str(exc))
                    break
                time.sleep(0.05)
            except Exception:
                log.exception("migration.take_back_failed", device=placed.id)
                break


def _abandon(sock: socket.socket) -> None:
    """Tell the receiver to drop what it has, if the connection still works (best effort)."""
    try:
        sock.settimeout(2.0)
        protocol.send_request(sock, Command.ABANDON)
    except OSError:
        pass
