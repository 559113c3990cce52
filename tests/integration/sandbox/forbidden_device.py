"""A test-only device plugin whose device thread makes a system call no filter allows
(``socket``), run as a script: ``python forbidden_device.py <seccomp mode> [declare]``.

The device is a port device nobody touches; its worker thread enters the ``device`` sandbox as
every device thread does, waits until the VM runs, then opens a socket. With ``declare`` the
plugin declares ``socket`` for its device threads through ``vmmkit_seccomp_syscalls``. The
script prints ``socket ok`` if the call went through, and exits with the guest's status.
"""

from __future__ import annotations

import socket
import sys
import threading
from typing import Any

import vmmkit
from vmmkit import hookimpl
from vmmkit.device import Device, DeviceRequest, DeviceType
from vmmkit.sandbox import DEVICE, enter_thread

PORT = 0x2F0
running = threading.Event()
workers: list[threading.Thread] = []


class ForbiddenCallDevice(Device):
    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        worker = threading.Thread(target=self._work, daemon=True)
        workers.append(worker)
        worker.start()

    def _work(self) -> None:
        enter_thread(DEVICE, "forbidden-dev")
        running.wait(60)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM):
            print("socket ok", flush=True)

    def read(self, offset: int, size: int) -> bytes:
        return b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


class ForbiddenCallType(DeviceType):
    name = "forbidden-call"
    description = "test only: a device thread that opens a socket"
    option = "forbidden-call"

    @classmethod
    def requests(cls, config: Any) -> list[DeviceRequest]:
        return [DeviceRequest(cls.name, d.id or "forbidden0", d, pio=(PORT, 1))
                for d in config.plugin_devices if d.type == cls.name]

    @classmethod
    def create(cls, ctx: Any, request: DeviceRequest) -> Device:
        return ForbiddenCallDevice(request.id)


class Plugin:
    def __init__(self, declare: bool) -> None:
        self.declare = declare

    @hookimpl
    def vmmkit_register_devices(self, registry: Any) -> None:
        registry.add(ForbiddenCallType)

    @hookimpl
    def vmmkit_seccomp_syscalls(self) -> dict[str, list[str]] | None:
        return {DEVICE: ["socket"]} if self.declare else None

    @hookimpl
    def vmmkit_vm_state_changed(self, machine: Any, old: str, new: str, detail: dict[str, Any]) -> None:
        if new == "Running":
            running.set()


def main() -> int:
    mode, declare = sys.argv[1], sys.argv[2:] == ["declare"]
    with vmmkit.Vm(kernel=vmmkit.demo_kernel(), cmdline="test=spin", memory="64M", serial="off",
                   hypervisor="kvm", seccomp=mode, plugins=[Plugin(declare)],
                   plugin_devices=[("forbidden-call", "id=forbidden0")]) as vm:
        vm.start()
        for worker in workers:
            worker.join(60)
        vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
