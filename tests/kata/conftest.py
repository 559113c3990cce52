"""The Kata Containers replay (issue #21): its modules import the Linux tier's initramfs and
boot helpers (``tests/linux``) and their own (``kata_*.py``, here)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for directory in (HERE, HERE.parent / "linux"):
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
