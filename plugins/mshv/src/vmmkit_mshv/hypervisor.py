"""The MSHV backend. So far it only probes the host: no vmmkit host has had /dev/mshv, so the
partition/VP ioctls are not written yet and ``create_vm`` says so instead of pretending."""

from __future__ import annotations

import errno
import os
from typing import ClassVar

from vmmkit.errors import CapabilityError
from vmmkit.hypervisor import Availability, Hypervisor, Vm

DEVICE = "/dev/mshv"


class MshvHypervisor(Hypervisor):
    name: ClassVar[str] = "mshv"
    description: ClassVar[str] = "Microsoft Hypervisor via /dev/mshv (probe only)"
    priority: ClassVar[int] = 20
    architectures: ClassVar[tuple[str, ...]] = ("x86_64",)

    @classmethod
    def is_available(cls) -> Availability:
        try:
            fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return Availability(False, f"{DEVICE} not found")
        except PermissionError:
            return Availability(False, f"{DEVICE}: permission denied")
        except OSError as exc:
            return Availability(False, f"{DEVICE}: {os.strerror(exc.errno or errno.EIO)}")
        os.close(fd)
        return Availability(False, "the mshv backend is a host probe only: partitions are not implemented yet")

    def create_vm(self, arch: str) -> Vm:
        raise CapabilityError("MSHV_CREATE_PARTITION", detail="the mshv backend does not create partitions yet")
