"""Which kernel the MSHV backend talks to (light: read at every start, before any VM).

``VMMKIT_MSHV_KERNEL`` unset or ``host``: ``/dev/mshv``; ``simulated``: the contract-test
simulator (:mod:`vmmkit_mshv.simulator`), which ``--hypervisor auto`` never picks."""

from __future__ import annotations

import os

KERNEL_ENV = "VMMKIT_MSHV_KERNEL"
SIMULATED = "simulated"
DEVICE = "/dev/mshv"


def simulator_selected() -> bool:
    """Whether the environment names the simulated kernel."""
    return os.environ.get(KERNEL_ENV, "host") == SIMULATED
