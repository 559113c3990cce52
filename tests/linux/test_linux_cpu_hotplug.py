"""vCPU hotplug judged by Linux: one boot of the team's kernel (PVH) with ``--cpus boot=2,max=3``,
the API socket and the event monitor; ``cpu_hotplug_init.sh`` is ``/init``.

Once the guest says it runs on CPUs 0-1, ``vm.resize desired_vcpus=3`` creates vCPU 2 (thread
``vcpu2``) and raises the GED's CPU bit; Linux's ACPI interpreter runs ``CSCN``, which notifies
``C002`` (device check), the ACPI processor driver adds it (``_STA``, ``_MAT``) and ``/init``
onlines it: ``/sys/devices/system/cpu/online`` reads 0-2. ``vm.resize desired_vcpus=2`` then sets
CRMV; Linux offlines CPU 2 and calls its ``_EJ0``; the request returns once it is ejected, its
thread is gone, and ``online`` reads 0-1.

Growing 2 -> 4 (the issue's numbers) hot-adds and onlines CPUs 2 and 3 in Linux too, but on the
kvm_pvm development host the guest then stalls with all four vCPUs busy in its kernel (an RCU
stall on CPU 1 is reported), three times out of three; 1 -> 3 -> 1, 2 -> 3 -> 2, 3 -> 4 -> 3 and
4 -> 3 complete. Until that is understood this test keeps to three vCPUs.

Requests the VM cannot take (beyond ``max``, zero, memory for a VM booted without hotplug
memory) answer 400 and change nothing. The monitor reports ``vm``/``resizing`` and ``vm``/``resized`` for each
resize, as Cloud Hypervisor's does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from initramfs import build_initramfs, missing_busybox_reason
from linuxboot import BASE_CMDLINE, LINUX_DIR, Boot, linux_missing_reason, scaled_timeout

from vmmkit.api.client import ApiClient, ApiError
from vmmkit.events import read_events
from vmmkit.testing import kvm_unusable_reason

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm]

HERE = Path(__file__).resolve().parent
PREFIX = "VMMKIT-CPUHP: "
#: The whole scenario, boot included: the boot alone is ~40-90 s on an idle kvm_pvm host, but
#: took 7-18 minutes with six other Linux guests on the same two cores, and onlining or
#: offlining a vCPU (stop_machine across emulated vCPUs) tens of seconds more.
TIMEOUT = scaled_timeout(600.0)


class Guest:
    """The VMM process and its console, read step by step."""

    def __init__(self, boot: Boot) -> None:
        self.boot = boot
        self.seen = 0

    def step(self, name: str, deadline: float) -> list[str]:
        """The words after ``name`` on the guest's next ``VMMKIT-CPUHP:`` line (which must be
        ``name``, not a timeout the guest reports)."""
        while time.monotonic() < deadline:
            for position in range(self.seen, len(self.boot.result.lines)):
                line = self.boot.result.lines[position][1]
                if PREFIX not in line:
                    continue
                self.seen = position + 1
                words = line.split(PREFIX, 1)[1].split()
                assert words and words[0] == name, f"expected {name!r}, the guest said {line!r}\n" \
                                                   f"{self.boot.result.describe()}"
                return words[1:]
            if self.boot._proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {name!r} from the guest\n{self.boot.wait().describe()}")

    def vcpu_threads(self) -> list[str]:
        """The VMM's threads named ``vcpuN``, sorted."""
        names = []
        for task in Path(f"/proc/{self.boot._proc.pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
            except OSError:
                continue  # the thread just ended
            if name.startswith("vcpu"):
                names.append(name)
        return sorted(names)


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[tuple[Guest, ApiClient, Path]]:
    for reason in (linux_missing_reason(LINUX_DIR), missing_busybox_reason(), kvm_unusable_reason()):
        if reason:
            pytest.skip(reason)
    initramfs = build_initramfs(tmp_path / "cpuhp.cpio", init=HERE / "cpu_hotplug_init.sh")
    socket_path = tmp_path / "api.sock"
    events = tmp_path / "events.json"
    command = [
        sys.executable, "-m", "vmmkit", "--hypervisor", "kvm", "--kernel", str(LINUX_DIR / "vmlinux"),
        "--initramfs", str(initramfs), "--cpus", "boot=2,max=3", "--memory", "size=128M", "--serial", "tty",
        "--cmdline", f"{BASE_CMDLINE} -- grown=0-2 shrunk=0-1",
        "--api-socket", f"path={socket_path}", "--event-monitor", f"path={events}",
    ]
    boot = Boot("cpu-hotplug", command, timeout=TIMEOUT)
    try:
        yield Guest(boot), ApiClient(str(socket_path), timeout=120), events
    finally:
        boot.kill()


def refused(api: ApiClient, body: dict[str, object]) -> ApiError:
    with pytest.raises(ApiError) as error:
        api.request("PUT", "vm.resize", body)
    return error.value


def test_linux_sees_vcpus_come_and_go(guest: tuple[Guest, ApiClient, Path], tmp_path: Path) -> None:
    vm, api, events = guest
    deadline = time.monotonic() + TIMEOUT
    assert vm.step("ready", deadline) == ["0-1"]
    assert vm.vcpu_threads() == ["vcpu0", "vcpu1"]

    for body in ({"desired_vcpus": 4}, {"desired_vcpus": 0}, {"desired_vcpus": 3, "desired_ram": 1 << 30}):
        error = refused(api, body)
        assert error.status == 400, (body, error)
    assert "max_vcpus (3" in " ".join(refused(api, {"desired_vcpus": 4}).messages)
    assert "desired_ram: this VM has no hotplug memory" in " ".join(
        refused(api, {"desired_vcpus": 3, "desired_ram": 1 << 30}).messages)
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 2
    assert vm.vcpu_threads() == ["vcpu0", "vcpu1"]

    grown = api.request("PUT", "vm.resize", {"desired_vcpus": 3})
    assert grown.status == 204, grown
    assert vm.vcpu_threads() == ["vcpu0", "vcpu1", "vcpu2"]
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 3
    assert vm.step("grown", deadline) == ["0-2"]

    started = time.monotonic()
    shrunk = api.request("PUT", "vm.resize", {"desired_vcpus": 2}, check=False)  # returns once Linux ejected them
    print(f"shrinking answered {shrunk.status} after {time.monotonic() - started:.1f} s")
    if shrunk.status == 504:  # Linux took longer than VCPU_EJECT_TIMEOUT (a very loaded host): still pending
        assert "did not eject its vCPUs" in shrunk.json()[0], shrunk
        while vm.vcpu_threads() != ["vcpu0", "vcpu1"] and time.monotonic() < deadline:
            time.sleep(1)
    else:
        assert shrunk.status == 204, shrunk
    assert vm.vcpu_threads() == ["vcpu0", "vcpu1"]
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 2
    counters = api.request("GET", "vm.counters").json()
    assert counters["_cpu_hotplug"]["ejects"] == 1, counters
    assert counters["_acpi_ged"]["cpu_notifications"] == 2, counters
    assert vm.step("shrunk", deadline) == ["0-1"]  # then the guest powers off

    result = vm.boot.wait()
    (tmp_path / "console.log").write_text(result.output)
    for at, line in result.lines:
        if PREFIX in line:
            print(f"{at:7.1f} s  {line}")
    assert result.returncode == 0, result.describe()
    assert "ACPI Error" not in result.output and "ACPI Warning" not in result.output, result.output
    resizes = [(e["source"], e["event"]) for e in read_events(events.read_text()) if "resiz" in e["event"]]
    expected = [("vm", "resizing"), ("vm", "resized")] * 2
    assert resizes == (expected[:3] if shrunk.status == 504 else expected), resizes
