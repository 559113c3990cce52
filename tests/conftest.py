"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis's per-example deadline (200 ms) measures the machine, not the code: on the shared
# 2-core development and CI hosts a parser example sometimes takes longer while guests boot
# next door. Property tests here check behaviour; speed is for bench/.
settings.register_profile("vmmkit", deadline=None)
settings.load_profile("vmmkit")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's read-only ../shared folder; absent in a user's fresh clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it holds the peer specs and the Linux test kernel)")
    return SHARED
