"""Run the test suite for one tox factor pair (hypervisor, architecture).

An environment whose hypervisor is absent or unusable here prints SKIPPED with the reason and
runs nothing; one whose hypervisor is usable must run at least one guest on it, or it fails
(it never passes vacuously).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from vmmkit.plugin import collect_registries, make_plugin_manager


def main() -> int:
    hypervisor = os.environ["VMMKIT_TEST_HYPERVISOR"]
    arch = os.environ["VMMKIT_TEST_ARCH"]
    label = f"{hypervisor}/{arch}"
    registries = collect_registries(make_plugin_manager())
    if hypervisor not in registries.hypervisors:
        known = ", ".join(registries.hypervisors.names())
        print(f"SKIPPED {label}: hypervisor {hypervisor!r} is not installed (installed: {known})")
        return 0
    backend = registries.hypervisors.get(hypervisor)
    if arch not in backend.architectures:
        print(f"SKIPPED {label}: {hypervisor} cannot run {arch} guests on this host")
        return 0
    availability = backend.is_available()
    if not availability:
        print(f"SKIPPED {label}: {hypervisor} is not usable here: {availability.reason}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "runs.json")
        env = dict(os.environ, VMMKIT_TEST_REPORT=report)
        status = subprocess.call([sys.executable, "-m", "pytest", *sys.argv[1:]], env=env)
        runs = json.load(open(report)) if os.path.exists(report) else {}
    ran = runs.get(label, 0)
    if status == 0 and ran == 0:
        print(f"FAILED {label}: the backend is usable but no test booted a guest on it")
        return 1
    note = f" ({availability.reason})" if availability.reason else ""
    print(f"{label}: {ran} tests booted guests on this backend{note}")
    return status


if __name__ == "__main__":
    sys.exit(main())
