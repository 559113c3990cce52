"""vmmkit.config: CLI parsing (CH syntax), defaults, validation, JSON and the CH schema."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmkit.config import (
    BalloonConfig,
    ConfigError,
    ConsoleConfig,
    CpuAffinity,
    CpuFeatures,
    CpusConfig,
    CpuTopology,
    DebugConsoleConfig,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    MemoryConfig,
    NetConfig,
    OptionParser,
    PayloadConfig,
    PlatformConfig,
    PluginDeviceConfig,
    PmemConfig,
    RateLimiterConfig,
    RngConfig,
    SerialConfig,
    TokenBucket,
    VirtQueueAffinity,
    VmConfig,
    VsockConfig,
    split_commas,
)
from vmmkit.errors import VmmError
from vmmkit.units import GiB, KiB, MiB, TiB, format_size, parse_size

SPEC = Path(__file__).parents[3].parent / "shared" / "specs" / "cloud-hypervisor.yaml"
SHARED = {"memory": "size=1G,shared=on"}


def error_of(call: Any, *args: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        call(*args, **kwargs)
    return info.value


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("2K", 2 * KiB),
        ("512M", 512 * MiB),
        ("1G", GiB),
        ("1T", TiB),
        (" 1G ", GiB),
        ("0", 0),
        (1024, 1024),
    ],
)
def test_sizes_accept_binary_suffixes(text: int | str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["12Q", "-1", "1.5G", "", "G", "1k", "1GB", "0x10", "١٢", True, None, -1, 2**64, "99999999999T"]
)
def test_bad_sizes_are_value_errors(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_format_size_reads_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_format_size_picks_the_largest_exact_unit() -> None:
    assert [format_size(n) for n in (512 * MiB, MiB + KiB, 3, 0)] == ["512M", "1025K", "3", "0"]


# --- the option parser ----------------------------------------------------------------------


def test_split_commas_respects_brackets_and_quotes() -> None:
    assert split_commas('a=1,b=[1,2],c="x,y",d=[[1,2],[3]]') == ["a=1", "b=[1,2]", "c=x,y", "d=[[1,2],[3]]"]


@pytest.mark.parametrize("text", ["a=[1,2", "a=1]", 'a="x', "a=[[1]"])
def test_split_commas_rejects_unbalanced_input(text: str) -> None:
    err = error_of(split_commas, text, option="--disk")
    assert err.option == "--disk"
    assert "invalid syntax" in str(err)


PARSER = OptionParser("--x", ("path", "on", "list", "n"), flags=("tty",))


def test_parser_keeps_the_last_value_and_treats_empty_as_unset() -> None:
    o = PARSER.parse("path=a,path=b,list=,tty")
    assert o.get("path") == "b"
    assert o.get("list") is None and o.is_set("list")
    assert o.is_set("tty") and not o.is_set("n")


def test_parser_empty_spec_sets_nothing() -> None:
    assert dict(PARSER.parse("  ").values) == {}


def test_unknown_key_lists_the_accepted_ones() -> None:
    err = error_of(PARSER.parse, "pth=a")
    assert (err.option, err.value) == ("--x", "pth")
    assert str(err) == "--x: unknown key 'pth' (expected one of: tty, path, on, list, n)"


@pytest.mark.parametrize(
    ("spec", "message"), [("path", "missing value for path"), ("tty=1", "tty takes no value")]
)
def test_key_and_flag_syntax(spec: str, message: str) -> None:
    assert message in str(error_of(PARSER.parse, spec))


@pytest.mark.parametrize(
    ("raw", "value"),
    [("on", True), ("off", False), ("true", True), ("FALSE", False), ("On", True), ("", False)],
)
def test_toggles(raw: str, value: bool) -> None:
    assert PARSER.parse(f"on={raw}").toggle("on") is value


def test_bad_toggle_names_option_key_and_value() -> None:
    err = error_of(PARSER.parse("on=yes").toggle, "on")
    assert (err.option, err.key, err.value, err.expected) == ("--x", "on", "yes", "on or off")


@pytest.mark.parametrize(
    ("raw", "value"), [("[0,2-4]", (0, 2, 3, 4)), ("5", (5,)), ("1-2", (1, 2)), ("[3,4]", (3, 4))]
)
def test_integer_lists(raw: str, value: tuple[int, ...]) -> None:
    assert PARSER.parse(f"list={raw}").integer_list("list") == value


@pytest.mark.parametrize("raw", ["[3-1]", "[a]", "[1,,2]", "[1-2-3]", "[-1]", "[]"])
def test_bad_integer_lists(raw: str) -> None:
    error_of(PARSER.parse(f"list={raw}").integer_list, "list")


@pytest.mark.parametrize("raw", ["-1", "1e3", "0x10", "١", "1" * 25])
def test_bad_integers(raw: str) -> None:
    error_of(PARSER.parse(f"n={raw}").integer, "n")


# --- cpus -----------------------------------------------------------------------------------


def test_cpus_defaults_are_chs() -> None:
    cpus = CpusConfig()
    assert (cpus.boot_vcpus, cpus.max_vcpus, cpus.max_phys_bits) == (1, 1, 46)
    assert (cpus.kvm_hyperv, cpus.nested, cpus.core_scheduling) == (False, True, "Vm")
    assert cpus.topology is None and cpus.affinity == () and cpus.features == CpuFeatures()
    assert CpusConfig.parse("") == cpus


def test_cpus_full_syntax() -> None:
    cpus = CpusConfig.parse(
        "boot=2,max=4,topology=1:2:1:2,kvm_hyperv=on,max_phys_bits=46,affinity=[0@[0-1],3@[4,6]],"
        "features=amx,nested=off,core_scheduling=vcpu"
    )
    assert cpus == CpusConfig(
        boot_vcpus=2,
        max_vcpus=4,
        topology=CpuTopology(threads_per_core=1, cores_per_die=2, dies_per_package=1, packages=2),
        kvm_hyperv=True,
        max_phys_bits=46,
        affinity=(CpuAffinity(vcpu=0, host_cpus=(0, 1)), CpuAffinity(vcpu=3, host_cpus=(4, 6))),
        features=CpuFeatures(amx=True),
        nested=False,
        core_scheduling="Vcpu",
    )


def test_max_vcpus_defaults_to_boot() -> None:
    assert CpusConfig.parse("boot=3").max_vcpus == 3
    assert CpusConfig(boot_vcpus=5).max_vcpus == 5


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("boot=0", "boot", 0),
        ("boot=255", "boot", 255),
        ("boot=2,max=1", "max", 1),
        ("max=300", "max", 300),
        ("boot=x", "boot", "x"),
        ("topology=1:2:1", "topology", "1:2:1"),
        ("topology=1:2:1:x", "topology", "1:2:1:x"),
        ("topology=1:1:1:0", "topology", "1:1:1:0"),
        ("boot=4,topology=1:2:1:1", "topology", "1:2:1:1"),
        ("boot=2,affinity=[2@[0]]", "affinity", 2),
        ("affinity=0@[1]", "affinity", "0@[1]"),
        ("features=avx512", "features", "avx512"),
        ("kvm_hyperv=maybe", "kvm_hyperv", "maybe"),
        ("max_phys_bits=65", "max_phys_bits", 65),
        ("core_scheduling=core", "core_scheduling", "core"),
    ],
)
def test_bad_cpus(spec: str, key: str, value: object) -> None:
    err = error_of(CpusConfig.parse, spec)
    assert (err.option, err.key) == ("--cpus", key)
    assert str(err).startswith("--cpus: ")
    assert repr(value) in str(err)


def test_cpus_boot_zero_message() -> None:
    err = error_of(VmConfig.from_cli, cpus="boot=0")
    assert str(err) == "--cpus: invalid value 0 for boot (expected an integer from 1 to 254)"


def test_vcpu_limit_is_254() -> None:
    assert CpusConfig.parse("boot=254").max_vcpus == 254
    error_of(CpusConfig, boot_vcpus=1, max_vcpus=255)


# --- memory ---------------------------------------------------------------------------------


def test_memory_defaults_are_chs() -> None:
    memory = MemoryConfig()
    assert memory.size == 512 * MiB and memory.hotplug_method == "Acpi"
    assert (memory.thp, memory.shared, memory.hugepages, memory.prefault) == (True, False, False, False)
    assert memory.hotplug_size is None and memory.hugepage_size is None
    assert MemoryConfig.parse("") == memory


def test_memory_full_syntax() -> None:
    memory = MemoryConfig.parse(
        "size=512M,mergeable=on,shared=on,hugepages=on,hugepage_size=2M,hotplug_method=virtio-mem,"
        "hotplug_size=1G,hotplugged_size=256M,prefault=on,thp=off"
    )
    assert memory == MemoryConfig(
        size=512 * MiB,
        mergeable=True,
        shared=True,
        hugepages=True,
        hugepage_size=2 * MiB,
        hotplug_method="VirtioMem",
        hotplug_size=GiB,
        hotplugged_size=256 * MiB,
        prefault=True,
        thp=False,
    )


def test_memory_converts_size_strings() -> None:
    assert MemoryConfig(size="1G", hotplug_size="2G").hotplug_size == 2 * GiB
    assert attrs.evolve(MemoryConfig(), size="4096").size == 4096


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("size=12Q", "size", "12Q"),
        ("size=0", "size", 0),
        ("size=1000", "size", 1000),
        ("hotplug_size=1001", "hotplug_size", 1001),
        ("hugepage_size=2M", "hugepage_size", 2 * MiB),
        ("hugepages=on,hugepage_size=3M", "hugepage_size", 3 * MiB),
        ("hotplugged_size=1G", "hotplugged_size", GiB),
        ("hotplug_size=1G,hotplugged_size=2G", "hotplugged_size", 2 * GiB),
        ("hotplug_method=pci", "hotplug_method", "pci"),
        ("shared=sure", "shared", "sure"),
    ],
)
def test_bad_memory(spec: str, key: str, value: object) -> None:
    err = error_of(MemoryConfig.parse, spec)
    assert (err.option, err.key, err.value) == ("--memory", key, value)


def test_memory_size_message() -> None:
    err = error_of(VmConfig.from_cli, memory="size=12Q")
    assert (
        str(err)
        == "--memory: invalid value '12Q' for size (expected a size such as 512M, 1G or a byte count)"
    )


def test_memory_errors_in_python_name_the_field() -> None:
    assert error_of(MemoryConfig, size="12Q").option == "size"
    assert error_of(MemoryConfig, size=4097).option == "size"


# --- disks ----------------------------------------------------------------------------------


def test_disk_brief_example() -> None:
    disk = DiskConfig.parse(
        "path=a.img,readonly=on,direct=on,num_queues=2,queue_size=256,id=disk0,serial=abc"
    )
    assert disk == DiskConfig(
        path="a.img", readonly=True, direct=True, num_queues=2, queue_size=256, id="disk0", serial="abc"
    )


def test_disk_defaults_are_chs() -> None:
    disk = DiskConfig(path="a")
    assert (disk.num_queues, disk.queue_size, disk.sparse, disk.backing_files) == (1, 128, True, False)
    assert (disk.image_type, disk.lock_granularity, disk.pci_segment, disk.transport) == (
        "Unknown",
        "ByteRange",
        0,
        None,
    )


def test_disk_rate_limits_affinity_and_more() -> None:
    disk = DiskConfig.parse(
        "path=a,bw_size=1000,bw_one_time_burst=10,bw_refill_time=100,ops_size=5,ops_refill_time=10,"
        "num_queues=4,queue_affinity=[0@[1],3@[5-6]],image_type=qcow2,lock_granularity=full,"
        "pci_segment=0,pci_device_id=5,iommu=on,backing_files=on,sparse=off,transport=mmio"
    )
    assert disk.rate_limiter_config == RateLimiterConfig(
        bandwidth=TokenBucket(size=1000, one_time_burst=10, refill_time=100),
        ops=TokenBucket(size=5, one_time_burst=0, refill_time=10),
    )
    assert disk.queue_affinity == (
        VirtQueueAffinity(queue_index=0, host_cpus=(1,)),
        VirtQueueAffinity(queue_index=3, host_cpus=(5, 6)),
    )
    assert (disk.image_type, disk.lock_granularity, disk.pci_device_id) == ("Qcow2", "Full", 5)
    assert (disk.iommu, disk.backing_files, disk.sparse, disk.transport) == (True, True, False, "mmio")


def test_disk_rate_limit_needs_size_and_refill_time() -> None:
    # CH drops a bucket given without its refill time (or with a zero) silently; vmmkit refuses it
    for spec, key in (("path=a,bw_size=1000", "bw_refill_time"), ("path=a,ops_refill_time=10", "ops_size"),
                      ("path=a,bw_size=0,bw_refill_time=10", "bw_size"),
                      ("path=a,ops_size=1,ops_refill_time=0", "ops_refill_time")):
        err = error_of(DiskConfig.parse, spec)
        assert (err.option, err.key) == ("--disk", key)


def test_vhost_user_disk() -> None:
    disk = DiskConfig.parse("vhost_user=on,socket=/tmp/blk.sock")
    assert (disk.path, disk.vhost_socket, disk.vhost_user) == (None, "/tmp/blk.sock", True)


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("path=a,readonly=maybe", "readonly", "maybe"),
        ("path=a,queue_size=100", "queue_size", 100),
        ("path=a,queue_size=2", "queue_size", 2),
        ("path=a,queue_size=65536", "queue_size", "65536"),
        ("path=a,num_queues=0", "num_queues", 0),
        ("readonly=on", "path", None),
        ("vhost_user=on", "socket", None),
        ("path=a,vhost_user=on,socket=s", "path", "a"),
        ("path=a,socket=s", "socket", "s"),
        ("path=a,serial=123456789012345678901", "serial", "123456789012345678901"),
        ("path=a,queue_affinity=[1@[0]]", "queue_affinity", 1),
        ("path=a,queue_affinity=[0@[0],0@[1]]", "queue_affinity", 0),
        ("path=a,queue_affinity=[x]", "queue_affinity", "[x]"),
        ("path=a,image_type=iso", "image_type", "iso"),
        ("path=a,transport=virtio", "transport", "virtio"),
        ("path=a,id=__disk", "id", "__disk"),
        ("path=a,pci_device_id=32", "pci_device_id", "32"),
        ("path=a,bw_size=1,bw_refill_time=1,rate_limit_group=g", "rate_limit_group", "g"),
    ],
)
def test_bad_disks(spec: str, key: str, value: object) -> None:
    err = error_of(DiskConfig.parse, spec)
    assert (err.option, err.key, err.value) == ("--disk", key, value)


def test_disk_unknown_key_message() -> None:
    message = str(error_of(VmConfig.from_cli, disks=["pth=a.img"]))
    assert message.startswith("--disk: unknown key 'pth' (expected one of: path, readonly, direct,")
    assert "transport" in message


# --- net ------------------------------------------------------------------------------------


def test_net_full_syntax() -> None:
    net = NetConfig.parse(
        "tap=tap0,mac=12:34:56:78:9a:bc,host_mac=12:34:56:78:9a:bd,ip=192.168.1.2,mask=255.255.0.0,"
        "fd=[3,4],num_queues=4,queue_size=512,id=net0,mtu=9000,offload_ufo=off,vhost_mode=server,"
        "iommu=on,transport=pci"
    )
    assert net == NetConfig(
        tap="tap0",
        mac="12:34:56:78:9a:bc",
        host_mac="12:34:56:78:9a:bd",
        ip="192.168.1.2",
        mask="255.255.0.0",
        fds=(3, 4),
        num_queues=4,
        queue_size=512,
        id="net0",
        mtu=9000,
        offload_ufo=False,
        vhost_mode="Server",
        iommu=True,
        transport="pci",
    )


def test_net_defaults_are_chs() -> None:
    net = NetConfig()
    assert (net.ip, net.mask, net.num_queues, net.queue_size) == ("192.168.249.1", "255.255.255.0", 2, 256)
    assert (net.vhost_mode, net.offload_tso, net.offload_ufo, net.offload_csum) == (
        "Client",
        True,
        True,
        True,
    )
    assert net.mac is None and net.fds == ()


def test_net_ipv6() -> None:
    assert NetConfig.parse("ip=fd00::1,mask=ffff:ffff:ffff:ffff::").ip == "fd00::1"


@pytest.mark.parametrize(
    ("spec", "key", "value"),
    [
        ("mac=12:34:56:78:9a", "mac", "12:34:56:78:9a"),
        ("mac=12-34-56-78-9a-bc", "mac", "12-34-56-78-9a-bc"),
        ("host_mac=zz:34:56:78:9a:bc", "host_mac", "zz:34:56:78:9a:bc"),
        ("ip=300.1.1.1", "ip", "300.1.1.1"),
        ("mask=255.0.255.0", "mask", "255.0.255.0"),
        ("ip=fd00::1", "mask", "255.255.255.0"),
        ("fd=[1]", "fd", 1),
        ("fd=[3,4]", "num_queues", 2),
        ("num_queues=1", "num_queues", 1),
        ("mtu=1000", "mtu", 1000),
        ("offload_csum=off", "offload_csum", False),
        ("vhost_mode=peer", "vhost_mode", "peer"),
        ("vhost_user=on", "socket", None),
        ("vhost_user=on,socket=s,iommu=on", "iommu", True),
        ("queue_size=300", "queue_size", 300),
    ],
)
def test_bad_nets(spec: str, key: str, value: object) -> None:
    err = error_of(NetConfig.parse, spec)
    assert (err.option, err.key, err.value) == ("--net", key, value)


# --- rng, balloon, fs, pmem, vsock, device ---------------------------------------------------


def test_rng() -> None:
    assert RngConfig().src == "/dev/urandom"
    assert RngConfig.parse("src=/dev/hwrng,iommu=on") == RngConfig(src="/dev/hwrng", iommu=True)
    assert RngConfig.parse("") == RngConfig()
    assert error_of(RngConfig.parse, "source=/dev/random").value == "source"


def test_balloon() -> None:
    balloon = BalloonConfig.parse("size=256M,deflate_on_oom=on,free_page_reporting=on")
    assert balloon == BalloonConfig(size=256 * MiB, deflate_on_oom=True, free_page_reporting=True)
    err = error_of(VmConfig.from_cli, balloon="size=1G")
    assert (err.option, err.key) == ("--balloon", "size")


def test_fs() -> None:
    fs = FsConfig.parse("tag=myfs,socket=/tmp/virtiofsd.sock,num_queues=2,queue_size=512,id=fs0")
    assert fs == FsConfig(tag="myfs", socket="/tmp/virtiofsd.sock", num_queues=2, queue_size=512, id="fs0")
    assert (FsConfig(tag="t", socket="s").num_queues, FsConfig(tag="t", socket="s").queue_size) == (1, 1024)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("socket=/s", "--fs: missing tag (expected tag=<tag_name>)"),
        ("tag=a", "--fs: missing socket (expected socket=<socket_path>)"),
        ("tag=" + "t" * 37 + ",socket=s", "--fs: invalid value '" + "t" * 37 + "' for tag"),
        ("tag=a,socket=s,iommu=on", "--fs: unknown key 'iommu'"),
    ],
)
def test_bad_fs(spec: str, message: str) -> None:
    assert str(error_of(FsConfig.parse, spec)).startswith(message)


def test_pmem() -> None:
    pmem = PmemConfig.parse("file=/tmp/pmem.img,size=1G,discard_writes=on,iommu=on,id=pm0")
    assert pmem == PmemConfig(file="/tmp/pmem.img", size=GiB, discard_writes=True, iommu=True, id="pm0")
    assert PmemConfig(file="x").size is None


@pytest.mark.parametrize(
    ("spec", "key"), [("size=1G", None), ("file=f,size=1M", "size"), ("file=f,size=huge", "size")]
)
def test_bad_pmem(spec: str, key: str | None) -> None:
    err = error_of(PmemConfig.parse, spec)
    assert (err.option, err.key) == ("--pmem", key)


def test_vsock() -> None:
    assert VsockConfig.parse("cid=3,socket=/tmp/vm.vsock") == VsockConfig(cid=3, socket="/tmp/vm.vsock")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("socket=/s", "--vsock: missing cid"),
        ("cid=3", "--vsock: missing socket"),
        ("cid=2,socket=s", "--vsock: invalid value 2 for cid"),
        ("cid=4294967295,socket=s", "--vsock: invalid value 4294967295 for cid"),
        ("cid=three,socket=s", "--vsock: invalid value 'three' for cid"),
    ],
)
def test_bad_vsock(spec: str, message: str) -> None:
    assert str(error_of(VsockConfig.parse, spec)).startswith(message)


def test_device() -> None:
    device = DeviceConfig.parse("path=/sys/bus/pci/devices/0000:01:00.0/,id=gpu0,iommu=on,pci_segment=0")
    assert device == DeviceConfig(path="/sys/bus/pci/devices/0000:01:00.0/", id="gpu0", iommu=True)
    assert str(error_of(DeviceConfig.parse, "id=x")) == "--device: missing path (expected path=<device_path>)"


def test_an_empty_command_line_is_allowed() -> None:
    assert VmConfig.from_cli(kernel="k", cmdline="").payload.cmdline == ""
    assert VmConfig.from_json({"payload": {"kernel": "k", "cmdline": ""}}).payload.cmdline == ""


def test_paths_accept_pathlike() -> None:
    assert DiskConfig(path=Path("/a.img")).path == "/a.img"
    assert PayloadConfig(kernel=Path("/vmlinux")).kernel == "/vmlinux"
    assert error_of(DiskConfig, path=b"/a.img").option == "path"


# --- serial and consoles ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("off", SerialConfig(mode="Off")),
        ("pty", SerialConfig(mode="Pty")),
        ("tty", SerialConfig(mode="Tty")),
        ("null", SerialConfig(mode="Null")),
        ("file=/tmp/serial.log", SerialConfig(mode="File", file="/tmp/serial.log")),
        ("socket=/tmp/serial.sock", SerialConfig(mode="Socket", socket="/tmp/serial.sock")),
    ],
)
def test_serial_modes(spec: str, expected: SerialConfig) -> None:
    assert SerialConfig.parse(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "--serial: no mode given"),
        ("file=", "--serial: missing path for file (expected file=<path>)"),
        ("socket=", "--serial: missing path for socket"),
        ("tty,file=/x", "--serial: more than one mode given (tty, file)"),
        ("ttyS0", "--serial: unknown key 'ttyS0'"),
        ("tty=on", "--serial: tty takes no value"),
        ("tty,iommu=on", "--serial: unknown key 'iommu'"),
    ],
)
def test_bad_serial(spec: str, message: str) -> None:
    assert str(error_of(SerialConfig.parse, spec)).startswith(message)


def test_console_modes_and_pci_keys() -> None:
    console = ConsoleConfig.parse("file=/tmp/c.log,iommu=on,id=con0,pci_segment=0,transport=mmio")
    assert console == ConsoleConfig(mode="File", file="/tmp/c.log", iommu=True, id="con0", transport="mmio")
    assert ConsoleConfig.parse("null").mode == "Null"
    assert str(error_of(ConsoleConfig.parse, "iommu=on")).startswith("--console: no mode given")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"mode": "File"}, "file"), ({"mode": "Socket"}, "socket"), ({"mode": "tty"}, "mode")],
)
def test_console_mode_needs_its_path(kwargs: dict[str, Any], field: str) -> None:
    assert error_of(SerialConfig, **kwargs).option == field
    assert error_of(ConsoleConfig, **kwargs).option == field


def test_debug_console() -> None:
    assert DebugConsoleConfig() == DebugConsoleConfig(mode="Off", iobase=0xE9)
    assert DebugConsoleConfig.parse("tty,iobase=0x80") == DebugConsoleConfig(mode="Tty", iobase=0x80)
    assert DebugConsoleConfig.parse("file=/tmp/dbg") == DebugConsoleConfig(mode="File", file="/tmp/dbg")
    assert error_of(DebugConsoleConfig.parse, "tty,iobase=233").key == "iobase"
    assert error_of(DebugConsoleConfig.parse, "socket=/s").value == "socket"


# --- platform -------------------------------------------------------------------------------


def test_platform_syntax_and_virtio_transport() -> None:
    platform = PlatformConfig.parse(
        "num_pci_segments=2,iommu_segments=[1],iommu_address_width=48,system_serial_number=SN1,"
        "system_uuid=1234,oem_strings=[a,b],system_manufacturer=ACME,virtio_transport=mmio,"
        "vfio_p2p_dma=off,iommufd=on"
    )
    assert platform == PlatformConfig(
        num_pci_segments=2,
        iommu_segments=(1,),
        iommu_address_width_bits=48,
        system_serial_number="SN1",
        system_uuid="1234",
        oem_strings=("a", "b"),
        system_manufacturer="ACME",
        virtio_transport="mmio",
        vfio_p2p_dma=False,
        iommufd=True,
    )
    assert PlatformConfig().virtio_transport is None  # the architecture's default


def test_platform_legacy_keys() -> None:
    platform = PlatformConfig.parse("serial_number=SN,uuid=U")
    assert (platform.system_serial_number, platform.system_uuid) == ("SN", "U")


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("num_pci_segments=0", "num_pci_segments"),
        ("num_pci_segments=97", "num_pci_segments"),
        ("iommu_segments=[1]", "iommu_segments"),
        ("iommu_address_width=65", "iommu_address_width"),
        ("virtio_transport=ccw", "virtio_transport"),
    ],
)
def test_bad_platform(spec: str, key: str) -> None:
    err = error_of(PlatformConfig.parse, spec)
    assert (err.option, err.key) == ("--platform", key)


# --- plugin devices -------------------------------------------------------------------------


def test_plugin_device_parse() -> None:
    device = PluginDeviceConfig.parse("example-led", "port=0x520,label=back,list=[1,2],id=led0")
    assert device == PluginDeviceConfig(
        type="example-led", options=(("port", "0x520"), ("label", "back"), ("list", "[1,2]")), id="led0"
    )
    assert device.get("port") == "0x520" and device.get("nope", "d") == "d"
    assert PluginDeviceConfig(type="x", options={"a": "1"}).options == (("a", "1"),)


def test_plugin_device_errors_name_the_plugin_option() -> None:
    assert error_of(PluginDeviceConfig.parse, "led", "flag").option == "--led"
    assert error_of(PluginDeviceConfig.parse, "led", "port=[1", option="--led-panel").option == "--led-panel"
    assert error_of(PluginDeviceConfig.parse, "led", "id=__x").key == "id"
    error_of(PluginDeviceConfig, type="bad name")
    error_of(PluginDeviceConfig, type="x", options=(("id", "1"),))
    error_of(PluginDeviceConfig, type="x", options=(("a", 1),))


def test_plugin_device_json() -> None:
    device = PluginDeviceConfig(type="led", options=(("port", "1"),), id="l0")
    assert device.to_json() == {"type": "led", "options": {"port": "1"}, "id": "l0"}
    assert PluginDeviceConfig.from_json(device.to_json()) == device
    assert (
        error_of(PluginDeviceConfig.from_json, {"type": "led", "options": {"port": 1}}).option
        == "options.port"
    )


# --- the VM ---------------------------------------------------------------------------------


def test_vm_defaults() -> None:
    vm = VmConfig()
    assert vm.serial == SerialConfig(mode="Tty")  # vmmkit: tty (CH: null)
    assert vm.console == ConsoleConfig(mode="Off")  # vmmkit: off (CH: tty)
    assert vm.memory.size == 512 * MiB and vm.cpus.boot_vcpus == 1 and vm.rng.src == "/dev/urandom"
    assert vm.payload == PayloadConfig() and not vm.bootable
    assert vm.platform is None and vm.virtio_transport == "pci"
    assert (vm.disks, vm.net, vm.fs, vm.pmem, vm.devices, vm.plugin_devices) == ((),) * 6
    assert VmConfig.from_cli() == vm


def full_cli_config() -> VmConfig:
    return VmConfig.from_cli(
        kernel="/vmlinux",
        cmdline="console=ttyS0 root=/dev/vda1",
        initramfs="/initrd",
        cpus="boot=2,max=4,topology=1:2:1:2,kvm_hyperv=on,max_phys_bits=46,affinity=[0@[0-1]],features=amx",
        memory="size=512M,shared=on,hugepages=on,hotplug_size=1G,hotplug_method=acpi",
        disks=[
            "path=a.img,readonly=on,direct=on,num_queues=2,queue_size=256,id=disk0,serial=abc",
            "path=b.img",
        ],
        net=["tap=tap0,mac=12:34:56:78:9a:bc,ip=10.0.0.1,mask=255.255.255.0,fd=[3,4],num_queues=4,id=net0"],
        rng="src=/dev/urandom",
        serial="file=/tmp/serial.log",
        console="pty",
        fs=["tag=myfs,socket=/tmp/fs.sock"],
        pmem=["file=/tmp/pmem,size=2M"],
        vsock="cid=3,socket=/tmp/vsock",
        devices=["path=/sys/bus/pci/devices/0000:01:00.0/,id=gpu"],
        platform="virtio_transport=mmio",
        plugin_devices=[("example-led", "port=0x520"), PluginDeviceConfig(type="other")],
        debug_console="tty",
        balloon="size=64M",
        watchdog=True,
        pvpanic=True,
    )


def test_from_cli_builds_every_section() -> None:
    vm = full_cli_config()
    assert vm.payload == PayloadConfig(
        kernel="/vmlinux", cmdline="console=ttyS0 root=/dev/vda1", initramfs="/initrd"
    )
    assert vm.bootable
    assert vm.cpus.topology == CpuTopology(
        threads_per_core=1, cores_per_die=2, dies_per_package=1, packages=2
    )
    assert vm.memory.hotplug_size == GiB
    assert [d.path for d in vm.disks] == ["a.img", "b.img"]
    assert vm.net[0].fds == (3, 4)
    assert vm.serial == SerialConfig(mode="File", file="/tmp/serial.log")
    assert vm.console.mode == "Pty" and vm.debug_console.mode == "Tty"
    assert vm.fs[0].tag == "myfs" and vm.pmem[0].size == 2 * MiB and vm.vsock is not None
    assert vm.devices[0].id == "gpu" and vm.balloon == BalloonConfig(size=64 * MiB)
    assert [p.type for p in vm.plugin_devices] == ["example-led", "other"]
    assert vm.watchdog and vm.pvpanic and vm.virtio_transport == "mmio"


def test_from_cli_takes_argparse_style_lists() -> None:
    assert (
        VmConfig.from_cli(disks=None, net=None, fs=None, pmem=None, devices=None, plugin_devices=None)
        == VmConfig()
    )
    assert VmConfig.from_cli(disks="path=a").disks == (DiskConfig(path="a"),)


@pytest.mark.parametrize(
    ("kwargs", "option", "value"),
    [
        ({"cpus": "boot=0"}, "--cpus", 0),
        ({"memory": "size=12Q"}, "--memory", "12Q"),
        ({"disks": ["path=a", "pth=b"]}, "--disk", "pth"),
        ({"net": ["mac=nope"]}, "--net", "nope"),
        ({"rng": "src=/dev/random,iommu=1"}, "--rng", "1"),
        ({"serial": "tty=1"}, "--serial", "tty=1"),
        ({"console": "bogus"}, "--console", "bogus"),
        ({"fs": ["tag=a,socket=b,num_queues=x"]}, "--fs", "x"),
        ({"pmem": ["file=f,size=3M"]}, "--pmem", 3 * MiB),
        ({"vsock": "cid=1,socket=s"}, "--vsock", 1),
        ({"devices": ["path=/d,pci_segment=abc"]}, "--device", "abc"),
        ({"platform": "virtio_transport=virtio"}, "--platform", "virtio"),
        ({"debug_console": "tty,iobase=0x10000"}, "--debug-console", "0x10000"),
        ({"balloon": "size=1Z"}, "--balloon", "1Z"),
        ({"kernel": ""}, "--kernel", ""),
        ({"plugin_devices": [("led", "port")]}, "--led", "port"),
        ({"plugin_devices": ["led"]}, "plugin_devices", "led"),
        ({"disks": [5]}, "--disk", 5),
    ],
)
def test_from_cli_errors_name_the_option(kwargs: dict[str, Any], option: str, value: object) -> None:
    err = error_of(VmConfig.from_cli, **kwargs)
    assert err.option == option
    assert str(err).startswith(f"{option}: ")
    assert err.value == value
    if err.reason is None:
        assert repr(value) in str(err)


def test_from_cli_missing_rng_src_names_option() -> None:
    # ``src=`` is an empty value, i.e. not set: the default source applies, as in CH
    assert VmConfig.from_cli(rng="src=").rng == RngConfig()


@pytest.mark.parametrize(
    ("kwargs", "option", "key"),
    [
        ({"disks": ["path=a,id=x", "path=b,id=x"]}, "--disk", "id"),
        ({"disks": ["path=a,id=x"], "net": ["id=x"]}, "--net", "id"),
        ({"fs": ["tag=a,socket=b"]}, "--fs", None),
        ({"disks": ["vhost_user=on,socket=s"]}, "--disk", None),
        ({"net": ["vhost_user=on,socket=s"]}, "--net", None),
        ({"disks": ["path=a,pci_segment=1"]}, "--disk", "pci_segment"),
        (
            {"disks": ["path=a,pci_segment=1"], "platform": "num_pci_segments=2,iommu_segments=[1]"},
            "--disk",
            "iommu",
        ),
        ({"devices": ["path=/sys/x", "path=/sys/x/"]}, "--device", "path"),
        ({"balloon": "size=512M"}, "--balloon", "size"),
        ({"plugin_devices": [("led", "id=a"), ("led", "id=a")]}, "--led", "id"),
    ],
)
def test_vm_level_checks_name_the_option(kwargs: dict[str, Any], option: str, key: str | None) -> None:
    err = error_of(VmConfig.from_cli, **kwargs)
    assert (err.option, err.key) == (option, key)


def test_iommu_segments() -> None:
    platform = "num_pci_segments=2,iommu_segments=[1]"
    vm = VmConfig.from_cli(disks=["path=a,pci_segment=1,iommu=on"], platform=platform)
    assert vm.iommu_required
    assert VmConfig.from_cli(platform="iommu_segments=[0]").rng.iommu is False  # as CH: not checked
    err = error_of(VmConfig.from_cli, fs=["tag=a,socket=s,pci_segment=1"], platform=platform, **SHARED)
    assert (err.option, err.key) == ("--fs", "pci_segment")


def test_shared_memory_satisfies_vhost_user_and_fs() -> None:
    vm = VmConfig.from_cli(fs=["tag=a,socket=b"], disks=["vhost_user=on,socket=s"], **SHARED)
    assert vm.fs[0].tag == "a"
    assert VmConfig.from_cli(fs=["tag=a,socket=b"], memory="hugepages=on").fs


def test_vm_checks_in_python_and_json_name_the_path() -> None:
    disk = DiskConfig(path="a", id="x")
    assert error_of(VmConfig, disks=[disk, disk]).option == "disks[1].id"
    err = error_of(VmConfig.from_json, {"disks": [{"path": "a", "id": "x"}, {"path": "b", "id": "x"}]})
    assert err.option == "disks[1].id" and "duplicate id 'x'" in str(err)


def test_evolve_revalidates() -> None:
    vm = VmConfig(cpus=CpusConfig(boot_vcpus=2))
    with pytest.raises(ConfigError):
        attrs.evolve(vm.cpus, max_vcpus=1)
    with pytest.raises(ConfigError):
        attrs.evolve(vm, memory=MemoryConfig(size="64M"), balloon=BalloonConfig(size="64M"))


def test_with_and_without_devices() -> None:
    vm = VmConfig(memory=MemoryConfig(shared=True))
    vm = (
        vm.with_disk(DiskConfig(path="a", id="d"))
        .with_net(NetConfig(id="n"))
        .with_fs(FsConfig(tag="t", socket="s"))
    )
    vm = vm.with_pmem(PmemConfig(file="p")).with_device(DeviceConfig(path="/v", id="v"))
    vm = vm.with_vsock(VsockConfig(cid=3, socket="s", id="vs")).with_plugin_device(
        PluginDeviceConfig(type="led")
    )
    assert (len(vm.disks), len(vm.net), len(vm.fs), len(vm.pmem), len(vm.devices)) == (1, 1, 1, 1, 1)
    assert vm.without_device("d").disks == () and vm.without_device("n").net == ()
    assert vm.without_device("v").devices == () and vm.without_device("vs").vsock is None
    with pytest.raises(ConfigError, match="no device with id 'nope'"):
        vm.without_device("nope")
    with pytest.raises(ConfigError, match="vsock already present"):
        vm.with_vsock(VsockConfig(cid=4, socket="t"))
    with pytest.raises(ConfigError, match="duplicate id 'd'"):
        vm.with_net(NetConfig(id="d"))


def test_assign_ids_counts_like_cloud_hypervisor() -> None:
    vm = VmConfig.from_cli(
        disks=["path=a", "path=b,id=mine", "path=c"],
        net=["tap=t0", "tap=t1,id=_fs3"],
        fs=["tag=x,socket=s"],
        pmem=["file=p"],
        vsock="cid=3,socket=v",
        devices=["path=/sys/v"],
        plugin_devices=[("led", "")],
        **SHARED,
    ).assign_ids()
    assert [d.id for d in vm.disks] == ["_disk0", "mine", "_disk1"]
    assert [n.id for n in vm.net] == ["_net2", "_fs3"]  # a taken name is skipped, as in CH
    assert [vm.fs[0].id, vm.pmem[0].id, vm.vsock.id if vm.vsock else None] == ["_fs4", "_pmem5", "_vsock6"]
    assert [vm.devices[0].id, vm.plugin_devices[0].id] == ["_vfio7", "_led8"]
    assert vm.rng.id is None and vm.console.id is None
    assert vm.assign_ids() == vm


def test_assigned_ids_can_be_removed() -> None:
    vm = VmConfig().with_disk(DiskConfig(path="a")).assign_ids()
    assert vm.without_device("_disk0") == VmConfig()


def test_transports() -> None:
    vm = VmConfig.from_cli(disks=["path=a", "path=b,transport=pci"], platform="virtio_transport=mmio")
    assert [vm.transport_of(d) for d in vm.disks] == ["mmio", "pci"]
    assert VmConfig().transport_of(RngConfig()) == "pci"


def test_iommu_required() -> None:
    assert not VmConfig().iommu_required
    assert VmConfig.from_cli(disks=["path=a,iommu=on"]).iommu_required
    assert VmConfig(iommu=True).iommu_required


def test_config_error_is_a_value_error_and_a_vmm_error() -> None:
    err = error_of(MemoryConfig.parse, "size=1X")
    assert isinstance(err, ValueError) and isinstance(err, VmmError)
    assert (err.option, err.key, err.value, err.expected) == ("--memory", "size", "1X", err.expected)
    copied = pickle.loads(pickle.dumps(err))
    assert str(copied) == str(err) and copied.key == "size"


# --- JSON -----------------------------------------------------------------------------------


CH_CREATE_EXAMPLE = {  # docs/api.md, "vm.create"
    "cpus": {"boot_vcpus": 4, "max_vcpus": 4},
    "payload": {
        "kernel": "/opt/clh/kernel/vmlinux-virtio-fs-virtio-iommu",
        "cmdline": "console=ttyS0 root=/dev/vda1 rw",
    },
    "disks": [{"path": "/opt/clh/images/focal-server-cloudimg-amd64.raw"}],
    "rng": {"src": "/dev/urandom"},
    "net": [{"ip": "192.168.10.10", "mask": "255.255.255.0", "mac": "12:34:56:78:90:01"}],
}

CH_INFO_CONFIG = {  # the shape of ``ch-remote info`` output of an older CH, which writes every null
    "cpus": {
        "boot_vcpus": 1,
        "max_vcpus": 1,
        "topology": None,
        "kvm_hyperv": False,
        "max_phys_bits": 46,
        "affinity": None,
        "features": {"amx": False},
    },
    "memory": {
        "size": 536870912,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "hotplug_size": None,
        "hotplugged_size": None,
        "shared": False,
        "hugepages": False,
        "hugepage_size": None,
        "prefault": False,
        "zones": None,
        "thp": True,
    },
    "payload": {"firmware": None, "kernel": "/vmlinux", "cmdline": "console=ttyS0", "initramfs": None},
    "rate_limit_groups": None,
    "disks": [
        {
            "path": "/focal.raw",
            "readonly": False,
            "direct": False,
            "iommu": False,
            "num_queues": 1,
            "queue_size": 128,
            "vhost_user": False,
            "vhost_socket": None,
            "rate_limit_group": None,
            "rate_limiter_config": None,
            "id": "_disk0",
            "disable_io_uring": False,
            "disable_aio": False,
            "pci_segment": 0,
            "serial": None,
            "queue_affinity": None,
        }
    ],
    "net": [
        {
            "tap": None,
            "ip": "192.168.249.1",
            "mask": "255.255.255.0",
            "mac": "2e:f2:44:5a:0d:a1",
            "host_mac": "8e:5c:1e:7a:d2:13",
            "mtu": None,
            "iommu": False,
            "num_queues": 2,
            "queue_size": 256,
            "vhost_user": False,
            "vhost_socket": None,
            "vhost_mode": "Client",
            "id": "_net1",
            "fds": None,
            "rate_limiter_config": None,
            "pci_segment": 0,
            "offload_tso": True,
            "offload_ufo": True,
            "offload_csum": True,
        }
    ],
    "rng": {"src": "/dev/urandom", "iommu": False},
    "balloon": None,
    "fs": None,
    "pmem": None,
    "serial": {"file": None, "mode": "Null", "iommu": False, "socket": None},
    "console": {"file": None, "mode": "Tty", "iommu": False, "socket": None},
    "debug_console": {"file": None, "mode": "Off", "iobase": 233},
    "devices": None,
    "user_devices": None,
    "vdpa": None,
    "vsock": None,
    "pvpanic": False,
    "iommu": False,
    "numa": None,
    "watchdog": False,
    "pci_segments": None,
    "platform": None,
    "tpm": None,
    "preserved_fds": None,
    "landlock_enable": False,
    "landlock_rules": None,
}


def test_ch_create_example() -> None:
    vm = VmConfig.from_json(CH_CREATE_EXAMPLE)
    assert (vm.cpus.boot_vcpus, vm.cpus.max_vcpus) == (4, 4)
    assert vm.payload.kernel == "/opt/clh/kernel/vmlinux-virtio-fs-virtio-iommu"
    assert vm.disks == (DiskConfig(path="/opt/clh/images/focal-server-cloudimg-amd64.raw"),)
    assert vm.net[0].mac == "12:34:56:78:90:01" and vm.memory == MemoryConfig()
    assert VmConfig.from_json(vm.to_json()) == vm


def test_ch_info_config_with_nulls_and_unknown_keys() -> None:
    """``strict=False`` reads another CH version's ``vm.info`` leniently, reporting what it skipped."""
    ignored: list[str] = []
    vm = VmConfig.from_json(CH_INFO_CONFIG, strict=False, ignored=ignored)
    assert sorted(ignored) == [
        "disks[0].disable_aio",
        "disks[0].disable_io_uring",
        "serial.iommu",
    ]
    assert vm.serial == SerialConfig(mode="Null") and vm.console == ConsoleConfig(mode="Tty")
    assert vm.disks[0].id == "_disk0" and vm.net[0].host_mac == "8e:5c:1e:7a:d2:13"
    assert vm.debug_console.iobase == 0xE9
    assert VmConfig.from_json(vm.to_json()) == vm


def test_json_rejects_unknown_keys_by_default() -> None:
    """CH ignores unknown keys (no ``deny_unknown_fields`` on its ``VmConfig``); vmmkit refuses
    them, so a misspelt key is never lost (issue #12)."""
    err = error_of(VmConfig.from_json, {"payload": {"kernel": "k"}, "disks": [{"path": "a", "read_only": True}]})
    assert err.option == "disks[0].read_only" and "unknown key" in str(err)
    # CH's own vm.info (disable_io_uring, disable_aio: false) reads back: Kata sends it (#21)
    assert VmConfig.from_json(CH_INFO_CONFIG).disks[0].path is not None
    assert error_of(VmConfig.from_json, {"payload": {"kernel": "k"}, "cpu": {}}).option == "cpu"
    assert VmConfig.from_json(CH_CREATE_EXAMPLE).cpus.boot_vcpus == 4
    assert VmConfig.from_json(CH_CREATE_EXAMPLE, strict=True).cpus.boot_vcpus == 4


def test_json_keys_of_the_schema_not_supported_yet_are_refused_by_name() -> None:
    assert error_of(VmConfig.from_json, {"numa": [{"guest_numa_id": 0}]}).option == "numa"
    assert error_of(VmConfig.from_json, {"tpm": {"socket": "/t"}}).option == "tpm"
    # at their default value they ask for nothing, as CH's own vm.info writes them
    assert VmConfig.from_json({"landlock_enable": False, "numa": None, "tpm": None}) == VmConfig()


def test_to_json_shape() -> None:
    data = VmConfig.from_cli(kernel="/k", memory="size=1G", serial="tty", disks=["path=a"]).to_json()
    assert data["memory"]["size"] == GiB and data["payload"] == {"kernel": "/k"}
    assert data["serial"] == {"mode": "Tty"} and data["console"]["mode"] == "Off"
    assert data["disks"][0]["path"] == "a" and "net" not in data and "vsock" not in data
    assert "plugin_devices" not in data and "transport" not in data["disks"][0]
    assert json.loads(json.dumps(data)) == data


def test_extensions_appear_in_json_only_when_set() -> None:
    vm = VmConfig.from_cli(
        disks=["path=a,transport=mmio"], platform="virtio_transport=mmio", plugin_devices=[("led", "a=1")]
    )
    data = vm.to_json()
    assert data["disks"][0]["transport"] == "mmio" and data["platform"]["virtio_transport"] == "mmio"
    assert data["plugin_devices"] == [{"type": "led", "options": {"a": "1"}}]
    assert "virtio_transport" not in VmConfig.from_cli(platform="num_pci_segments=2").to_json()["platform"]
    assert VmConfig.from_json(data) == vm


def test_json_platform_aliases() -> None:
    vm = VmConfig.from_json({"platform": {"serial_number": "old", "uuid": "u"}})
    assert vm.platform == PlatformConfig(system_serial_number="old", system_uuid="u")
    vm = VmConfig.from_json({"platform": {"serial_number": "old", "system_serial_number": "new"}})
    assert vm.platform is not None and vm.platform.system_serial_number == "new"


@pytest.mark.parametrize(
    ("data", "option"),
    [
        ({"memory": {"size": "512M"}}, "memory.size"),
        ({"memory": {"size": 1000}}, "memory.size"),
        ({"memory": {"size": -4096}}, "memory.size"),
        ({"memory": {"shared": "yes"}}, "memory.shared"),
        ({"cpus": {"boot_vcpus": True}}, "cpus.boot_vcpus"),
        ({"cpus": {"boot_vcpus": 1.0}}, "cpus.boot_vcpus"),
        ({"cpus": {"boot_vcpus": 0}}, "cpus.boot_vcpus"),
        ({"cpus": {"topology": {"threads_per_core": 1}}}, "cpus.topology.cores_per_die"),
        ({"cpus": 4}, "cpus"),
        ({"disks": {"path": "a"}}, "disks"),
        ({"disks": [{"path": "a"}, {"path": "b", "num_queues": "2"}]}, "disks[1].num_queues"),
        (
            {"disks": [{"path": "a", "queue_affinity": [{"queue_index": 0, "host_cpus": ["x"]}]}]},
            "disks[0].queue_affinity[0].host_cpus[0]",
        ),
        ({"serial": {"mode": "tty"}}, "serial.mode"),
        ({"serial": {"mode": "File"}}, "serial.file"),
        ({"console": {"mode": "Bogus"}}, "console.mode"),
        ({"net": [{"mac": "nope"}]}, "net[0].mac"),
        ({"vsock": {"cid": 3}}, "vsock.socket"),
        ({"payload": {"kernel": 5}}, "payload.kernel"),
        ({"platform": {"oem_strings": ["a", 5]}}, "platform.oem_strings[1]"),
        ({"plugin_devices": [{"type": "led", "options": []}]}, "plugin_devices[0].options"),
    ],
)
def test_bad_json_names_the_path(data: dict[str, Any], option: str) -> None:
    err = error_of(VmConfig.from_json, data)
    assert err.option == option
    assert str(err).startswith(f"{option}: ")


def test_json_body_must_be_an_object() -> None:
    assert error_of(VmConfig.from_json, [1]).option == "$"


def test_sections_have_json_too() -> None:
    disk = DiskConfig(path="a", rate_limiter_config=RateLimiterConfig(ops=TokenBucket(size=1, refill_time=2)))
    assert disk.to_json()["rate_limiter_config"] == {"ops": {"size": 1, "refill_time": 2}}
    assert DiskConfig.from_json(disk.to_json()) == disk
    assert error_of(DiskConfig.from_json, {"num_queues": 0, "path": "a"}).option == "num_queues"


def test_full_config_round_trips() -> None:
    vm = full_cli_config()
    assert VmConfig.from_json(vm.to_json()) == vm
    assert VmConfig.from_json(json.loads(json.dumps(vm.to_json()))) == vm


# --- strategies for valid configurations ----------------------------------------------------

# Any text but lone surrogates and NUL (a NUL byte is refused: paths and strings end at one).
paths = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=12)
pow2 = st.sampled_from([4, 8, 64, 128, 256, 1024, 32768])
maybe = st.booleans()

cpus_st = st.integers(1, 16).flatmap(
    lambda boot: st.builds(
        CpusConfig,
        boot_vcpus=st.just(boot),
        max_vcpus=st.integers(boot, 254),
        kvm_hyperv=maybe,
        max_phys_bits=st.integers(1, 64),
        nested=maybe,
        core_scheduling=st.sampled_from(["Vm", "Vcpu", "Off"]),
        features=st.builds(CpuFeatures, amx=maybe),
    )
)
memory_st = st.builds(
    MemoryConfig,
    size=st.integers(1, 2**20).map(lambda n: n * 4096),
    shared=st.just(True),
    mergeable=maybe,
    prefault=maybe,
    thp=maybe,
    hotplug_method=st.sampled_from(["Acpi", "VirtioMem"]),
    hotplug_size=st.none() | st.integers(1, 2**20).map(lambda n: n * 4096),
)
bucket_st = st.builds(
    TokenBucket,
    size=st.integers(1, 2**64 - 1),  # zero is refused (CH would read it as "no bucket")
    refill_time=st.integers(1, 2**32),
    one_time_burst=st.none() | st.integers(0, 10**9),
)
disk_st = st.builds(
    DiskConfig,
    path=paths,
    readonly=maybe,
    direct=maybe,
    iommu=maybe,
    num_queues=st.integers(1, 16),
    queue_size=pow2,
    serial=st.none() | st.text("abc123", min_size=1, max_size=20),
    rate_limiter_config=st.none()
    | st.builds(RateLimiterConfig, bandwidth=st.none() | bucket_st, ops=st.none() | bucket_st),
    image_type=st.sampled_from(["FixedVhd", "Qcow2", "Raw", "Vhdx", "Unknown"]),
    transport=st.sampled_from([None, "pci", "mmio"]),
)
mac_st = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
net_st = st.builds(
    NetConfig,
    tap=st.none() | st.text("tap0123", min_size=1, max_size=8),
    mac=st.none() | mac_st,
    num_queues=st.integers(2, 16),
    queue_size=pow2,
    mtu=st.none() | st.integers(1280, 65535),
    vhost_mode=st.sampled_from(["Client", "Server"]),
)
console_st = st.one_of(
    st.builds(ConsoleConfig, mode=st.sampled_from(["Off", "Pty", "Tty", "Null"]), iommu=maybe),
    st.builds(ConsoleConfig, mode=st.just("File"), file=paths),
    st.builds(ConsoleConfig, mode=st.just("Socket"), socket=paths),
)
serial_st = st.one_of(
    st.builds(SerialConfig, mode=st.sampled_from(["Off", "Pty", "Tty", "Null"])),
    st.builds(SerialConfig, mode=st.just("File"), file=paths),
    st.builds(SerialConfig, mode=st.just("Socket"), socket=paths),
)
vm_st = st.builds(
    VmConfig,
    cpus=cpus_st,
    memory=memory_st,
    payload=st.builds(
        PayloadConfig, kernel=st.none() | paths, cmdline=st.none() | paths, firmware=st.none() | paths
    ),
    disks=st.lists(disk_st, max_size=3),
    net=st.lists(net_st, max_size=2),
    rng=st.builds(RngConfig, src=paths, iommu=maybe),
    fs=st.lists(
        st.builds(FsConfig, tag=st.text("abcdef", min_size=1, max_size=36), socket=paths), max_size=2
    ),
    pmem=st.lists(
        st.builds(PmemConfig, file=paths, size=st.none() | st.integers(1, 64).map(lambda n: n * 2 * MiB)),
        max_size=2,
    ),
    serial=serial_st,
    console=console_st,
    devices=st.lists(st.builds(DeviceConfig, path=paths), max_size=2, unique_by=lambda d: d.path.rstrip("/")),
    vsock=st.none() | st.builds(VsockConfig, cid=st.integers(3, 2**32 - 2), socket=paths),
    iommu=maybe,
    watchdog=maybe,
    pvpanic=maybe,
    platform=st.none()
    | st.builds(
        PlatformConfig,
        virtio_transport=st.sampled_from(["pci", "mmio"]),
        oem_strings=st.lists(paths, max_size=2),
    ),
    plugin_devices=st.lists(
        st.builds(
            PluginDeviceConfig,
            type=st.sampled_from(["led", "virtio-foo"]),
            options=st.dictionaries(st.text("xyz", min_size=1), paths, max_size=3),
        ),
        max_size=2,
    ),
).map(lambda vm: vm.assign_ids() if vm.watchdog else vm)


@given(vm_st)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_json_round_trip(vm: VmConfig) -> None:
    assert VmConfig.from_json(vm.to_json()) == vm
    assert VmConfig.from_json(json.loads(json.dumps(vm.to_json())), strict=True) == vm


@given(vm_st)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_assign_ids_gives_unique_ids(vm: VmConfig) -> None:
    assigned = vm.assign_ids()
    ids = [d.id for d in (*assigned.disks, *assigned.net, *assigned.fs, *assigned.pmem, *assigned.devices)]
    assert None not in ids and len(set(ids)) == len(ids)


# --- the CH schema --------------------------------------------------------------------------


def _openapi_to_jsonschema(node: Any, *, closed: bool) -> Any:
    """OpenAPI 3.0 schema objects as JSON Schema: ``nullable`` becomes a ``null`` type; with
    ``closed``, objects reject properties the schema does not list."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(item, closed=closed) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_to_jsonschema(value, closed=closed) for key, value in node.items()}
    if out.pop("nullable", False):
        out = {"anyOf": [out, {"type": "null"}]}
    if closed and "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _validator(closed: bool) -> Any:
    if not SPEC.is_file():
        pytest.skip("../shared/specs/cloud-hypervisor.yaml not present")
    yaml = pytest.importorskip("yaml")
    jsonschema = pytest.importorskip("jsonschema")
    spec = yaml.safe_load(SPEC.read_text())
    components = _openapi_to_jsonschema(copy.deepcopy(spec["components"]), closed=closed)
    schema = {"$ref": "#/components/schemas/VmConfig", "components": components}
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def vmconfig_schema() -> Any:
    return _validator(closed=False)


@pytest.fixture(scope="module")
def closed_vmconfig_schema() -> Any:
    return _validator(closed=True)


def test_the_schema_rejects_wrong_documents(vmconfig_schema: Any) -> None:
    assert not vmconfig_schema.is_valid({"cpus": {"boot_vcpus": 1, "max_vcpus": 1}})  # no payload
    assert not vmconfig_schema.is_valid({"payload": {}, "serial": {"mode": "Tty2"}})


@pytest.mark.parametrize(
    "vm",
    [
        VmConfig(),
        full_cli_config(),
        VmConfig.from_json(CH_INFO_CONFIG, strict=False),
        VmConfig.from_json(CH_CREATE_EXAMPLE),
    ],
    ids=["defaults", "full-cli", "ch-info", "ch-create"],
)
def test_to_json_matches_the_ch_schema(vmconfig_schema: Any, vm: VmConfig) -> None:
    vmconfig_schema.validate(vm.to_json())


def test_to_json_uses_only_ch_properties(closed_vmconfig_schema: Any) -> None:
    """Without vmmkit extensions (and without net ``fds``, which CH serialises but does not
    document), every property vmmkit writes is one CH's schema lists."""
    vm = VmConfig.from_cli(
        kernel="/k",
        cpus="boot=2,max=4,topology=1:2:1:2,affinity=[0@[0-1]],features=amx,core_scheduling=off",
        memory="size=1G,shared=on,hugepages=on,hugepage_size=2M,hotplug_size=1G,hotplugged_size=512M,hotplug_method=virtio-mem",
        disks=[
            "path=a,bw_size=1,bw_refill_time=1,num_queues=2,queue_affinity=[0@[1]],pci_device_id=3,image_type=raw"
        ],
        net=["tap=t,mac=12:34:56:78:9a:bc,host_mac=12:34:56:78:9a:bd,mtu=1500,ops_size=1,ops_refill_time=2"],
        fs=["tag=a,socket=s,id=fs0"],
        pmem=["file=p,size=2M"],
        vsock="cid=3,socket=v",
        devices=["path=/sys/x,x_nv_gpudirect_clique=1"],
        console="socket=/c",
        serial="file=/s",
        debug_console="file=/d",
        balloon="size=1M,free_page_reporting=on",
        platform="num_pci_segments=2,iommu_segments=[1],oem_strings=[a],system_uuid=u,tdx=on",
    ).assign_ids()
    closed_vmconfig_schema.validate(vm.to_json())


@given(vm_st)
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_random_configs_match_the_ch_schema(vmconfig_schema: Any, vm: VmConfig) -> None:
    vmconfig_schema.validate(vm.to_json())


# --- nothing but ConfigError ----------------------------------------------------------------

VALUES = [
    "",
    "on",
    "off",
    "true",
    "0",
    "1",
    "2",
    "3",
    "4",
    "256",
    "4096",
    "2M",
    "1G",
    "12Q",
    "0xe9",
    "[0@[0-1]]",
    "[3,4]",
    "[0,2-3]",
    "1:2:1:2",
    "1:1:1:0",
    "x",
    "-1",
    "a.img",
    "/tmp/s",
    "12:34:56:78:9a:bc",
    "255.255.255.0",
    "fd00::1",
    "[",
    "]",
    '"',
    "\udcff",
    "9" * 30,
    "amx",
    "mmio",
    "pci",
    "acpi",
    "virtio-mem",
    "raw",
    "full",
    "server",
    "vm",
]
junk = st.text(st.sampled_from(list('abc=,[]@:-"0123456789xKMGT /\\\udcff\x00é')), max_size=30)


def specs_for(parser: OptionParser) -> st.SearchStrategy[str]:
    """Mostly well-formed values of this option (its own keys), sometimes junk."""
    keys = parser.keys or ("port", "label", "id")
    item = st.one_of(
        st.tuples(st.sampled_from(keys), st.sampled_from(VALUES) | junk).map("=".join),
        st.sampled_from(parser.flags or keys),
        junk,
    )
    weighted = st.lists(st.tuples(st.sampled_from(keys), st.sampled_from(VALUES)).map("=".join), max_size=6)
    return st.one_of(
        weighted.map(",".join),
        (st.sampled_from(parser.flags) if parser.flags else st.just("")).flatmap(
            lambda flag: weighted.map(lambda items: ",".join([flag, *items]) if flag else ",".join(items))
        ),
        st.lists(item, max_size=6).map(",".join),
        st.text(max_size=40),
    )


PLUGIN_PARSER = OptionParser("--led", any_key=True)
PARSERS = [
    (CpusConfig.parse, CpusConfig._PARSER),
    (MemoryConfig.parse, MemoryConfig._PARSER),
    (DiskConfig.parse, DiskConfig._PARSER),
    (NetConfig.parse, NetConfig._PARSER),
    (RngConfig.parse, RngConfig._PARSER),
    (BalloonConfig.parse, BalloonConfig._PARSER),
    (FsConfig.parse, FsConfig._PARSER),
    (PmemConfig.parse, PmemConfig._PARSER),
    (SerialConfig.parse, SerialConfig._PARSER),
    (ConsoleConfig.parse, ConsoleConfig._PARSER),
    (DebugConsoleConfig.parse, DebugConsoleConfig._PARSER),
    (DeviceConfig.parse, DeviceConfig._PARSER),
    (VsockConfig.parse, VsockConfig._PARSER),
    (PlatformConfig.parse, PlatformConfig._PARSER),
    (lambda spec: PluginDeviceConfig.parse("led", spec), PLUGIN_PARSER),
]
specs = st.one_of(*(specs_for(parser) for _, parser in PARSERS))


@pytest.mark.parametrize(("parse", "parser"), PARSERS, ids=[parser.option for _, parser in PARSERS])
@given(data=st.data())
@settings(max_examples=300)
def test_random_option_values_raise_only_config_error(parse: Any, parser: OptionParser, data: Any) -> None:
    spec = data.draw(specs_for(parser))
    try:
        parse(spec)
    except ConfigError as err:
        assert err.option == parser.option


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "cpus": specs_for(CpusConfig._PARSER),
            "memory": specs_for(MemoryConfig._PARSER),
            "disks": st.lists(specs_for(DiskConfig._PARSER), max_size=2),
            "net": st.lists(specs_for(NetConfig._PARSER), max_size=2),
            "fs": st.lists(specs_for(FsConfig._PARSER), max_size=2),
            "pmem": st.lists(specs_for(PmemConfig._PARSER), max_size=2),
            "devices": st.lists(specs_for(DeviceConfig._PARSER), max_size=2),
            "serial": specs_for(SerialConfig._PARSER),
            "console": specs_for(ConsoleConfig._PARSER),
            "vsock": specs_for(VsockConfig._PARSER),
            "balloon": specs_for(BalloonConfig._PARSER),
            "platform": specs_for(PlatformConfig._PARSER),
            "kernel": st.text(max_size=5),
            "plugin_devices": st.lists(
                st.tuples(st.sampled_from(["led", "bad name"]), specs_for(PLUGIN_PARSER)), max_size=2
            ),
        },
    )
)
def test_random_command_lines_raise_only_config_error(kwargs: dict[str, Any]) -> None:
    try:
        VmConfig.from_cli(**kwargs)
    except ConfigError as err:
        assert err.option.startswith("--") or err.option == "plugin_devices"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
json_keys = st.sampled_from(
    [
        "cpus",
        "memory",
        "payload",
        "disks",
        "net",
        "rng",
        "serial",
        "console",
        "debug_console",
        "fs",
        "pmem",
        "vsock",
        "devices",
        "platform",
        "balloon",
        "plugin_devices",
        "iommu",
        "numa",
    ]
)
section_keys = st.sampled_from(
    [
        "boot_vcpus",
        "max_vcpus",
        "topology",
        "size",
        "path",
        "mode",
        "file",
        "socket",
        "num_queues",
        "id",
        "cid",
        "tag",
        "mac",
        "ip",
        "mask",
        "options",
        "type",
        "serial_number",
        "iommu_segments",
        "affinity",
        "fds",
    ]
)
json_docs = st.dictionaries(
    json_keys,
    st.one_of(
        json_values,
        st.dictionaries(section_keys, json_values, max_size=4),
        st.lists(st.dictionaries(section_keys, json_values, max_size=4), max_size=2),
    ),
    max_size=5,
)


@given(json_docs, st.booleans())
def test_random_json_raises_only_config_error(data: dict[str, Any], strict: bool) -> None:
    try:
        VmConfig.from_json(data, strict=strict)
    except ConfigError as err:
        assert not err.option.startswith("--")


def test_a_pci_slot_for_a_virtio_mmio_device_is_refused_not_ignored() -> None:
    err = error_of(VmConfig.from_cli, disks=["path=a,transport=mmio,pci_device_id=3"])
    assert err.option == "--disk" and "pci_device_id" in str(err)
    err = error_of(VmConfig.from_json, {"net": [{"pci_device_id": 3}], "platform": {"virtio_transport": "mmio"}})
    assert err.option == "net[0].pci_device_id"
    VmConfig.from_cli(disks=["path=a,transport=pci,pci_device_id=3"], platform="virtio_transport=mmio")
    VmConfig.from_cli(devices=["path=/sys/x,pci_device_id=3"], platform="virtio_transport=mmio")  # VFIO: PCI
