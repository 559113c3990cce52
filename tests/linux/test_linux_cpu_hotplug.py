"""vCPU hotplug judged by Linux: one boot of the team's kernel (PVH) with ``--cpus boot=2,max=4``,
the API socket and the event monitor; ``cpu_hotplug_init.sh`` is ``/init``.

Once the guest says it runs on CPUs 0-1, ``vm.resize desired_vcpus=4`` creates vCPUs 2 and 3
(threads ``vcpu2``, ``vcpu3``) and raises the GED's CPU bit; Linux's ACPI interpreter runs
``CSCN``, which notifies ``C002`` and ``C003`` (device check), the ACPI processor driver adds
them (``_STA``, ``_MAT``) and ``/init`` onlines them: ``/sys/devices/system/cpu/online`` reads
0-3. ``vm.resize desired_vcpus=2`` then sets CRMV; Linux offlines CPUs 2 and 3 and calls their
``_EJ0``; the request returns once they are ejected, their threads are gone, and ``online``
reads 0-1.

(Growing 2 -> 4 once stalled the guest on kvm_pvm hosts: Linux's first paravirtual IPI to more
than one CPU, a VMCALL, never completed there. The pvm quirks now hide KVM's hypercall-based
features, ``vmmkit_kvm/quirks/pvm.py``.)

The same boot then judges ACPI memory hotplug (``--memory size=128M,hotplug_method=acpi,
hotplug_size=128M``): ``vm.resize desired_ram=256M`` is a new DIMM in the MHPC register block
and a GED notification; Linux's ACPI interpreter runs ``\\_SB_.MHPC.MSCN``, its
``acpi_memhotplug`` driver reads the slot's ``_CRS`` and adds the range at 4 GiB (memory block
32 of 128 MiB), and ``MemTotal`` grows by exactly 128 MiB. (Plugging twice and ejecting a DIMM
again is ``test_linux_memory_hotplug.py``'s extra variant: ~6 min on kvm_pvm, over CI's budget.)

Requests the VM cannot take (beyond ``max``, zero, memory beyond ``hotplug_size`` or not in
128 MiB steps) answer 400 and change nothing, also when the vCPU half of the request was fine.
The monitor reports ``vm``/``resizing`` and ``vm``/``resized`` for each resize, as Cloud
Hypervisor's does (and ``resizing`` alone for a memory request the memory manager refused).
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
MiB = 1 << 20
BOOT_RAM = 128 * MiB
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
        "--initramfs", str(initramfs), "--cpus", "boot=2,max=4", "--serial", "tty",
        "--memory", "size=128M,hotplug_method=acpi,hotplug_size=128M",
        "--cmdline", f"{BASE_CMDLINE} memhp_default_state=online_movable -- grown=0-3 shrunk=0-1 memory=yes",
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

    for body in ({"desired_vcpus": 5}, {"desired_vcpus": 0}, {"desired_vcpus": 4, "desired_ram": 1 << 30}):
        error = refused(api, body)
        assert error.status == 400, (body, error)
    assert "max_vcpus (4" in " ".join(refused(api, {"desired_vcpus": 5}).messages)
    # the vCPU half is fine, the memory half beyond hotplug_size: nothing changes
    assert "at most" in " ".join(refused(api, {"desired_vcpus": 4, "desired_ram": 1 << 30}).messages)
    assert "128 MiB" in " ".join(refused(api, {"desired_ram": BOOT_RAM + 64 * MiB}).messages)
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 2
    assert api.info()["memory_actual_size"] == BOOT_RAM
    assert vm.vcpu_threads() == ["vcpu0", "vcpu1"]

    grown = api.request("PUT", "vm.resize", {"desired_vcpus": 4})
    assert grown.status == 204, grown
    assert vm.vcpu_threads() == ["vcpu0", "vcpu1", "vcpu2", "vcpu3"]
    assert api.info()["config"]["cpus"]["boot_vcpus"] == 4
    assert vm.step("grown", deadline) == ["0-3"]

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
    assert counters["_cpu_hotplug"]["ejects"] == 2, counters
    assert counters["_acpi_ged"]["cpu_notifications"] == 2, counters
    online, boot_kb = vm.step("shrunk", deadline)
    assert online == "0-1"

    started = time.monotonic()
    plugged = api.request("PUT", "vm.resize", {"desired_ram": BOOT_RAM + 128 * MiB})
    assert plugged.status == 204, plugged
    assert api.info()["memory_actual_size"] == BOOT_RAM + 128 * MiB
    words = vm.step("memory", deadline)  # then the guest powers off
    print(f"Linux saw the DIMM {time.monotonic() - started:.1f} s after the request")
    assert int(words[0]) - int(boot_kb) == 128 * 1024, (boot_kb, words)
    assert words[1:] == ["memory32"], words  # 4 GiB / 128 MiB: the DIMM's _CRS base

    result = vm.boot.wait()
    (tmp_path / "console.log").write_text(result.output)
    for at, line in result.lines:
        if PREFIX in line:
            print(f"{at:7.1f} s  {line}")
    assert result.returncode == 0, result.describe()
    assert "ACPI Error" not in result.output and "ACPI Warning" not in result.output, result.output
    resizes = [(e["source"], e["event"]) for e in read_events(events.read_text()) if "resiz" in e["event"]]
    refusals = [("vm", "resizing")] * 3  # the memory manager's three refusals (1 GiB twice, 192 MiB)
    cycle = [("vm", "resizing"), ("vm", "resized")]
    vcpus = cycle + (cycle[:1] if shrunk.status == 504 else cycle)
    assert resizes == refusals + vcpus + cycle, resizes
