"""The team's Linux 6.1 kernel boots on vmmkit with 2 vCPUs, a virtio disk, NIC, RNG and
console and the serial console, through PVH (``vmlinux``, virtio over PCI) and through the
Linux boot protocol (``bzImage``, virtio over MMIO); the project's ``/init`` checks what it
sees, and QEMU (TCG) running the same kernel and initramfs prints the same check lines.

Each boot happens once per session (see conftest.py); the tests below read its console.
"""

from __future__ import annotations

import datetime
import re

import pytest
from linuxboot import (
    GUEST_ADDRESS,
    HOST_ADDRESS,
    HVC_LINE,
    PATTERN_OFFSET,
    PATTERN_SIZE,
    PER_QUEUE_PATTERN_OFFSET,
    block_pattern,
)

pytestmark = [pytest.mark.slow, pytest.mark.requires_kvm]

VMMKIT_BOOTS = [
    pytest.param("pvh", marks=pytest.mark.linux_boot("pvh"), id="pvh-vmlinux-pci"),
    pytest.param("bzimage", marks=pytest.mark.linux_boot("bzimage"), id="bzimage-mmio"),
]
TRANSPORT = {"pvh": "pci", "bzimage": "mmio", "qemu": "pci"}
DISK_SECTORS = 64 * 1024 * 1024 // 512

#: Kernel log lines that point at a platform problem (a table Linux rejects, a device it cannot
#: probe, a lost interrupt). Matched case-sensitively, anywhere in the line.
WARNING_SIGNS = re.compile(
    r"WARNING|BUG|Call Trace|FW Bug|Firmware Bug|ACPI Error|ACPI Warning|ACPI BIOS|"
    r"failed|can't|cannot|timed out|spurious|No irq handler|nobody cared|MP-BIOS|"
    r"Unknown kernel command line|unable to|not found|bad |invalid|Disabling IRQ"
)
#: Lines that match but are explained: not vmmkit's doing.
EXPLAINED = (
    # On a kvm_pvm host the PIT runs in userspace, slowed down, and each of the thousands of
    # port reads of Linux's quick PIT calibration is a VM exit: when the host is busy the
    # calibration gives up and Linux takes the TSC frequency from tsc_early_khz instead.
    "tsc: Fast TSC calibration failed",
)


def kernel_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"\[\s*\d+\.\d+\] ", line)]


def assert_clean_run(result, files) -> None:  # type: ignore[no-untyped-def]
    assert not result.timed_out, result.describe()
    assert result.returncode == 0, result.describe()
    assert any("done:" in line for line in result.init_lines), result.describe()


def expected_init_lines(result, *, net: bool) -> list[str]:  # type: ignore[no-untyped-def]
    """What /init must print (the RTC's date taken from the output, after checking it)."""
    rtc = [line for line in result.init_lines if line.startswith("ok rtc:")]
    assert rtc, result.describe()
    date = rtc[0].rsplit(" ", 1)[1]
    today = datetime.datetime.now(datetime.UTC).date()
    assert abs((datetime.date.fromisoformat(date) - today).days) <= 1, rtc[0]
    release = result.init_lines[0].removeprefix("start: Linux ")
    net_line = (
        f"ok net: eth0 {GUEST_ADDRESS}, ping {HOST_ADDRESS} answered" if net else "skip net: no address given"
    )
    return [
        f"start: Linux {release}",
        "ok cpus: 2 online (0-1)",
        "ok memory: 128 MiB in 1 online block(s)",
        "ok serial: ttyS0 on IO-APIC pin 4, edge",
        "ok virtio devices: blk console net rng" if net else "ok virtio devices: blk console rng",
        f"ok block: vda, {DISK_SECTORS} sectors of 512 bytes",
        "ok block: pattern written at 1 MiB and read back",
        "ok block: 2 request queues",
        "ok block: a write from each CPU's queue read back",
        net_line,
        "ok hwrng: read from virtio_rng",
        "ok console: wrote to hvc0",
        f"ok rtc: rtc_cmos, date {date}",
        f"done: {12 if net else 11} checks, 0 failed",
    ]


@pytest.mark.parametrize("boot", VMMKIT_BOOTS)
def test_linux_reaches_init_and_powers_off(linux_boots, boot: str) -> None:
    """vmmkit exits 0 when the guest's /init powers off, after every check passed."""
    result, files = linux_boots.get(boot)
    assert_clean_run(result, files)
    net = linux_boots.net_reason is None
    assert result.init_lines == expected_init_lines(result, net=net), result.describe()
    assert result.time_of("Run /init as init process") is not None


@pytest.mark.parametrize("boot", VMMKIT_BOOTS)
def test_kernel_finds_vmmkit_platform(linux_boots, boot: str) -> None:
    """What Linux reports about the firmware tables and devices vmmkit gives it."""
    result, _ = linux_boots.get(boot)
    log = "\n".join(kernel_lines(result.output))
    expected = [
        # ACPI: the MADT's processors, IOAPIC and overrides.
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        "smp: Brought up 1 node, 2 CPUs",
        # The MCFG's ECAM window.
        "PCI: MMCONFIG for domain 0000 [bus 00-ff] at [mem 0xe8000000-0xf7ffffff]",
        # Legacy devices from the DSDT.
        "rtc_cmos 00:01: registered as rtc0",
        "i8042: PNP: PS/2 Controller [PNP0303:PS2K] at 0x60,0x64",
        "ACPI: button: Power Button [PWRB]",
        # The disk, with the image's size.
        f"[vda] {DISK_SECTORS} 512-byte logical blocks (67.1 MB/64.0 MiB)",
        "ACPI: PM: Preparing to enter system sleep state S5",
    ]
    if TRANSPORT[boot] == "pci":
        # The host bridge from the DSDT, its config space, and the virtio 1.x PCI functions:
        # blk 1042, console 1043, rng 1044 (and net 1041 with a tap).
        expected += [
            "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
            "pci 0000:00:00.0: [8086:0d57] type 00 class 0x060000",
            "[1af4:1042] type 00 class 0x018000",
            "[1af4:1043] type 00 class 0x078000",
            "[1af4:1044] type 00 class 0xff0000",
        ]
    else:
        # virtio-mmio devices come from the DSDT (LNRO0005), never also from the command line.
        assert "virtio_mmio.device=" not in log
    missing = [text for text in expected if text not in log]
    assert not missing, f"missing from the kernel log: {missing}\n{result.describe()}"
    assert re.search(r"ttyS0 at I/O 0x3f8 \(irq = \d+, base_baud = 115200\) is a 16550A", log), log


@pytest.mark.parametrize("boot", VMMKIT_BOOTS)
def test_kernel_log_has_no_platform_warnings(linux_boots, boot: str) -> None:
    result, _ = linux_boots.get(boot)
    suspicious = [
        line for line in kernel_lines(result.output)
        if WARNING_SIGNS.search(line) and not any(text in line for text in EXPLAINED)
    ]
    assert not suspicious, "\n".join(suspicious)


@pytest.mark.parametrize("boot", VMMKIT_BOOTS)
def test_virtio_devices_use_the_requested_transport(linux_boots, boot: str) -> None:
    result, _ = linux_boots.get(boot)
    virtio = [line for line in result.info_lines if line.startswith("virtio: ")]
    assert virtio, result.describe()
    wrong = [line for line in virtio if f" over {TRANSPORT[boot]}," not in line]
    assert not wrong, virtio


@pytest.mark.parametrize("boot", VMMKIT_BOOTS)
def test_guest_writes_reach_the_host_files(linux_boots, boot: str) -> None:
    """The block pattern is in the image file, also where each vCPU wrote it through its own
    queue (``--disk num_queues=2``); the virtio console's line is in its file."""
    result, files = linux_boots.get(boot)
    assert_clean_run(result, files)
    assert "ok block: 2 request queues" in result.init_lines, result.init_lines
    pattern = block_pattern(linux_boots.patterns[boot])
    with open(files.disk, "rb") as image:
        image.seek(PATTERN_OFFSET)
        assert image.read(PATTERN_SIZE) == pattern
        for cpu in range(2):
            image.seek(PER_QUEUE_PATTERN_OFFSET + cpu * PATTERN_SIZE)
            assert image.read(PATTERN_SIZE) == pattern, f"the write from CPU {cpu}'s queue"
    assert HVC_LINE in files.hvc.read_text()


@pytest.mark.requires_qemu
@pytest.mark.linux_boot("pvh", "qemu")
def test_qemu_tcg_prints_the_same_init_lines(linux_boots) -> None:
    """The same kernel and initramfs under QEMU (TCG) see the same things as under vmmkit."""
    qemu, qemu_files = linux_boots.get("qemu")
    assert_clean_run(qemu, qemu_files)
    vmmkit, _ = linux_boots.get("pvh")
    assert_clean_run(vmmkit, None)

    def comparable(lines: list[str]) -> list[str]:
        return [re.sub(r"date \d{4}-\d\d-\d\d", "date <today>", line) for line in lines]

    assert comparable(vmmkit.init_lines) == comparable(qemu.init_lines)
