"""Several vCPUs at once (each on its own thread, the GIL released in KVM_RUN), and pausing a
vCPU with kick() from another thread without losing the exit in flight."""

from __future__ import annotations

import threading
import time

import pytest
from kvm_testlib import DONE_PORT, RecordingOps

from vmmkit.hypervisor import ExitReason

pytestmark = pytest.mark.requires_kvm

STOP_FLAG = 0x3800
#: Increment the counter at %rdi until the host sets STOP_FLAG, then halt.
SPIN = f"""
1:  incq (%rdi)
    cmpb $0, {STOP_FLAG:#x}
    je 1b
    hlt
"""


def _wait(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_two_vcpus_run_concurrently(make_guest) -> None:
    guest = make_guest(SPIN, vcpus=2, regs=[{"rdi": 0x3000}, {"rdi": 0x3100}])
    mem = guest.memory
    results: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, guest.run(i, timeout=30)), daemon=True)
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    _wait(lambda: mem.read_u64(0x3000) > 100 and mem.read_u64(0x3100) > 100, what="both counters")
    # Both make progress over the same interval: they are running at the same time.
    a0, b0 = mem.read_u64(0x3000), mem.read_u64(0x3100)
    time.sleep(0.1)
    a1, b1 = mem.read_u64(0x3000), mem.read_u64(0x3100)
    assert a1 > a0 and b1 > b0
    mem.write_u8(STOP_FLAG, 1)
    for thread in threads:
        thread.join(10)
    assert results[0].reason is ExitReason.HLT and results[1].reason is ExitReason.HLT
    assert guest.vcpus[0].get_regs().rdi == 0x3000 and guest.vcpus[1].get_regs().rdi == 0x3100


def test_kick_pauses_a_spinning_guest_and_it_resumes_correctly(make_guest) -> None:
    guest = make_guest(SPIN, regs=[{"rdi": 0x3000}])
    vcpu, mem = guest.vcpu, guest.memory
    paused, resume = threading.Event(), threading.Event()
    outcome: list = []

    def vcpu_thread() -> None:
        while True:
            exit_ = vcpu.run()
            if exit_.reason is ExitReason.INTERRUPTED:
                paused.set()
                assert resume.wait(10)
                resume.clear()
                vcpu.clear_kick()
                continue
            outcome.append(exit_)
            return

    thread = threading.Thread(target=vcpu_thread, daemon=True)
    thread.start()
    _wait(lambda: mem.read_u64(0x3000) > 50, what="the guest to spin")
    start = time.monotonic()
    vcpu.kick()
    assert paused.wait(2)
    assert time.monotonic() - start < 0.5
    frozen = mem.read_u64(0x3000)
    time.sleep(0.1)
    assert mem.read_u64(0x3000) == frozen  # really paused
    paused.clear()
    resume.set()
    _wait(lambda: mem.read_u64(0x3000) > frozen + 50, what="the guest to resume")
    mem.write_u8(STOP_FLAG, 1)
    thread.join(10)
    assert outcome and outcome[0].reason is ExitReason.HLT
    assert vcpu.exit_counts()["intr"] >= 1


def test_a_kick_before_run_returns_at_once_without_running_the_guest(make_guest) -> None:
    guest = make_guest("incq 0x3000\n hlt")
    guest.vcpu.kick()
    assert guest.vcpu.run().reason is ExitReason.INTERRUPTED
    assert guest.vcpu.run().reason is ExitReason.INTERRUPTED  # sticky until cleared
    assert guest.memory.read_u64(0x3000) == 0
    guest.vcpu.clear_kick()
    assert guest.run().reason is ExitReason.HLT
    assert guest.memory.read_u64(0x3000) == 1


@pytest.mark.parametrize("callback", [False, True], ids=["return-dispatch", "callback-dispatch"])
def test_kicks_during_port_reads_lose_no_exit(make_guest, callback) -> None:
    """The guest checks that every IN returns the next number; kicks keep landing while the
    host is answering, so some land with a read in flight. KVM must complete each such read
    on the next KVM_RUN before reporting the kick: none may be lost or repeated."""
    n = 400
    sequence = iter(range(n + 100))
    in_flight = []  # reads answered while a kick was already pending

    def answer(size: int) -> bytes:
        time.sleep(0.0002)  # widen the window for a kick to land mid-read
        if guest.vcpu.kicked:
            in_flight.append(1)
        return next(sequence).to_bytes(size, "little")

    ops = RecordingOps(reads={0x10: answer})
    guest = make_guest(
        f"""
        xor %ebx, %ebx
    1:  in $0x10, %eax
        cmp %ebx, %eax
        jne 2f
        inc %ebx
        cmp ${n}, %ebx
        jb 1b
        mov %ebx, 0x3000
        out %al, ${DONE_PORT:#x}
        hlt
    2:  mov %eax, 0x3004
        movl $0xdead, 0x3000
        out %al, ${DONE_PORT:#x}
        hlt
        """,
        ops=ops,
        callback=callback,
    )
    vcpu = guest.vcpu
    interrupted = 0
    stop = threading.Event()

    def kicker() -> None:
        while not stop.is_set():
            vcpu.kick()
            time.sleep(0.0003)

    thread = threading.Thread(target=kicker, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    try:
        while not ops.done.is_set():
            assert time.monotonic() < deadline
            exit_ = vcpu.run()
            assert exit_.reason is ExitReason.INTERRUPTED, exit_
            interrupted += 1
            vcpu.clear_kick()
    finally:
        stop.set()
        thread.join()
    assert guest.memory.read_u32(0x3000) == n, f"guest saw {guest.memory.read_u32(0x3004)}"
    assert len(ops.of("pio_read")) == n
    assert interrupted > 5  # the kicks really interleaved with the reads
    assert in_flight, "no kick landed while a read was in flight"
    print(f"{interrupted} kicks, {len(in_flight)} with a read in flight")
