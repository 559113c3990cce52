"""``vm.resize``'s ``desired_ram`` (Cloud Hypervisor's ``VmResizeData.desired_ram``, bytes):
checked here, carried out by :meth:`vmmkit.vmm.Vmm.resize`."""

from __future__ import annotations

from vmmkit.api.http import HttpError
from vmmkit.memory import PAGE_SIZE


def checked_ram(desired_ram: object) -> int:
    """``desired_ram`` as a size (JSON: a positive integer, whole pages).

    :raises HttpError: 400 for a value that is not such a size.
    """
    if not isinstance(desired_ram, int) or isinstance(desired_ram, bool) or desired_ram <= 0:
        raise HttpError(400, f"desired_ram: a size in bytes (a positive integer) is required, not {desired_ram!r:.40}")
    if desired_ram % PAGE_SIZE:
        raise HttpError(400, f"desired_ram: {desired_ram} is not a multiple of the {PAGE_SIZE}-byte page")
    return desired_ram
