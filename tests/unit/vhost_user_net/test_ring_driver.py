"""The backend's hook for devices that drive rings themselves (``RingDriver``, net's receive
queues), in-process over a real Unix socket and memfd, no root: the driver hears of kicks and of
the ring stopping, a descriptor it watches calls it from the loop, and a driver that raises (a
bug) stops its ring, with the frontend told on the ring's error eventfd, never the daemon."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from net_frontend import DESC_WRITE, NetFrontend
from vmmkit_vhost_user.backend import Backend, DrivenRing

from vmmkit.virtio.chain import DescriptorChain


class Driver:
    """Ring 0 driven by the device: each kick pops what is there and completes it with 7 bytes
    written; ring 1 is served by ``handle``. ``explode`` makes the next kick raise."""

    name = "driver-test"
    num_queues = 2
    inflight = False

    def __init__(self) -> None:
        self.events: list[str] = []
        self.explode = False
        self.backend: Backend | None = None
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def device_features(self) -> int:
        return 0

    def set_features(self, features: int) -> None:
        pass

    def config(self) -> bytes | None:
        return None

    def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        self.events.append(f"handle {queue_index}")
        return 0

    def reset(self) -> None:
        self.events.append("reset")

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    def drives(self, queue_index: int) -> bool:
        return queue_index == 0

    def ring_kicked(self, ring: DrivenRing) -> None:
        self.events.append(f"kicked {ring.index}")
        if self.explode:
            raise RuntimeError("a bug in the driver")
        assert self.backend is not None
        self.backend.watch(self.pipe_r, self._readable)
        used = []
        while (chain := ring.queue.pop()) is not None:
            used.append((chain.head, chain.write(b"driven!")))
        ring.complete(used)

    def _readable(self) -> None:
        os.read(self.pipe_r, 100)
        self.events.append("readable")
        raise RuntimeError("a bug in a watch callback")

    def ring_stopped(self, queue_index: int) -> None:
        self.events.append(f"stopped {queue_index}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Driver, Backend, Path]]:
    path = Path("/tmp") / f"vunet-driver-{os.getpid()}-{tmp_path.name[-12:]}.sock"
    driver = Driver()
    backend = Backend(driver, str(path))
    thread = threading.Thread(target=backend.serve_forever, daemon=True)
    thread.start()
    try:
        yield driver, backend, path
    finally:
        backend.stop()
        thread.join(10)
        assert not thread.is_alive()
        backend.close()
        path.unlink(missing_ok=True)
        os.close(driver.pipe_r)
        os.close(driver.pipe_w)


def _wait(condition: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_driven_ring_is_kicked_stopped_and_its_watch_is_served(served: tuple[Driver, Backend, Path]) -> None:
    driver, _backend, path = served
    front = NetFrontend(path)
    try:
        front.handshake()
        assert front.rx.start() == 0 and front.tx.start() == 0
        front.rx.post_buffer(0, 64)
        front.rx.wait_used(1)
        assert front.rx.used(0) == (0, 7) and front.rx.read_slot(0, 7) == b"driven!"
        front.tx.desc_write(0, front.tx.slot(0), 64, 0)
        front.tx.post(0)
        front.tx.wait_used(1)
        assert "kicked 0" in driver.events and "handle 1" in driver.events and "handle 0" not in driver.events
        # A watch callback that raises is dropped; the loop goes on (the frontend is still answered).
        os.write(driver.pipe_w, b"x")
        _wait(lambda: "readable" in driver.events, "the watch was not served")
        os.write(driver.pipe_w, b"x")
        assert front.alive() and driver.events.count("readable") == 1
        assert front.rx.stop() == 1 and "stopped 0" in driver.events
    finally:
        front.close()
    _wait(lambda: "reset" in driver.events, "the device was not reset")


def test_a_driver_that_raises_stops_its_ring_not_the_daemon(served: tuple[Driver, Backend, Path]) -> None:
    driver, _backend, path = served
    front = NetFrontend(path)
    try:
        front.handshake()
        driver.explode = True
        assert front.rx.start() == 0 and front.tx.start() == 0
        front.rx.desc_write(0, front.rx.slot(0), 64, DESC_WRITE)
        front.rx.post(0)
        _wait(front.rx.stopped, "the ring did not stop")
        front.tx.desc_write(0, front.tx.slot(0), 64, 0)
        front.tx.post(0)
        front.tx.wait_used(1)  # the other ring serves on
        assert front.alive() and front.rx.used_idx() == 0
    finally:
        front.close()
