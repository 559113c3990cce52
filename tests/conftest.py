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

#: Test directories whose tests run one after another on one worker under ``pytest -n auto
#: --dist loadgroup`` (the README's command): each of their tests keeps a host core busy for
#: minutes (a Linux guest on kvm_pvm, a QEMU lab), so two of them side by side would only slow
#: each other, and their session fixtures (shared boots, the lab build) are built once.
SERIAL_GROUPS = {"linux": "linux-guests", "lab": "lab"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist runs on one worker (--dist loadgroup)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = REPO_ROOT / "tests"
    for item in items:
        parts = item.path.relative_to(tests).parts if item.path.is_relative_to(tests) else ()
        group = SERIAL_GROUPS.get(parts[0]) if len(parts) > 1 else None
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's read-only ../shared folder; absent in a user's fresh clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it holds the peer specs and the Linux test kernel)")
    return SHARED
