"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Hypothesis's per-example deadline (200 ms) measures the machine, not the code: on the shared
# 2-core development and CI hosts a parser example sometimes takes longer while guests boot
# next door. Property tests here check behaviour; speed is for bench/.
settings.register_profile("vmmkit", deadline=None)
settings.load_profile("vmmkit")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """How ``pytest -n auto`` (the README's command) shares the tests out: the Linux tier runs
    on one worker, one test after another (each keeps a core busy for minutes; two side by side
    with the module that boots three kernels at once starved each other past their timeouts on
    this 2-core host), the lab's tests on one worker (they share one lab build), the Kata replay
    (``tests/kata``, a Linux boot per runtime) on one worker of its own, every other
    test wherever a worker is free. xdist's ``--dist loadgroup`` would say this with markers,
    but it cannot rename node ids on pytest 9."""
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module.startswith("tests/lab/"):
                return "tests/lab"
            if module.startswith("tests/linux/"):
                return "tests/linux"
            if module.startswith("tests/kata/"):  # two Linux boots: one worker, off the Linux lane
                return "tests/kata"
            return nodeid

    return Scheduling(config, log)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's read-only ../shared folder; absent in a user's fresh clone."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it holds the peer specs and the Linux test kernel)")
    return SHARED
