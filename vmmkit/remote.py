"""``vmmkit-remote``: control a running VMM over its API socket, as ``ch-remote`` does.

    vmmkit-remote --api-socket /run/vm.sock ping
    vmmkit-remote --api-socket /run/vm.sock create vm.json      (or - for stdin)
    vmmkit-remote --api-socket /run/vm.sock boot
    vmmkit-remote --api-socket /run/vm.sock add-disk path=disk.img,readonly=on
    vmmkit-remote --api-socket /run/vm.sock add-net fd=[3],mac=12:34:56:78:9a:bc   (3: an fd of
                                                                  this process, sent by SCM_RIGHTS)
    vmmkit-remote --api-socket /run/vm.sock add-pmem file=pmem.img,size=64M
    vmmkit-remote --api-socket /run/vm.sock remove-device _disk0
    vmmkit-remote --api-socket /run/vm.sock snapshot file:///var/snap      (a paused VM)
    vmmkit-remote --api-socket /run/vm.sock restore source_url=file:///var/snap,prefault=on
    vmmkit-remote --api-socket /run/dst.sock receive-migration unix:/run/mig.sock   (a VMM without a VM)
    vmmkit-remote --api-socket /run/vm.sock send-migration [--local] unix:/run/mig.sock
    vmmkit-remote --api-socket /run/vm.sock resize --cpus 4 --memory 1G
    vmmkit-remote --api-socket /run/vm.sock resize --balloon 256M
    vmmkit-remote --api-socket /run/vm.sock info | counters | pause | resume | reboot |
                                       power-button | nmi | shutdown | delete | shutdown-vmm

Answers with a body (ping, info, counters, a hot-added device) are printed as JSON. Exit
status: 0 on success, 1 when the VMM refused (its messages on stderr, one per line, as
ch-remote prints them) or cannot be reached, 2 for a usage error (a bad device spec).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vmmkit import __version__

EXIT_FAILURE = 1
EXIT_USAGE = 2

# subcommand: (method, endpoint, help)
_SIMPLE: dict[str, tuple[str, str, str]] = {
    "ping": ("GET", "vmm.ping", "Ping the VMM to check for API server availability"),
    "shutdown-vmm": ("PUT", "vmm.shutdown", "Shutdown the VMM"),
    "boot": ("PUT", "vm.boot", "Boot a created VM"),
    "info": ("GET", "vm.info", "Info on the VM"),
    "counters": ("GET", "vm.counters", "Counters from the VM"),
    "pause": ("PUT", "vm.pause", "Pause the VM"),
    "resume": ("PUT", "vm.resume", "Resume the VM"),
    "shutdown": ("PUT", "vm.shutdown", "Shutdown the VM"),
    "reboot": ("PUT", "vm.reboot", "Reboot the VM"),
    "power-button": ("PUT", "vm.power-button", "Trigger a power button in the VM"),
    "delete": ("PUT", "vm.delete", "Delete a VM"),
    "nmi": ("PUT", "vm.nmi", "Trigger NMI"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmmkit-remote",
                                     description="Remotely control a vmmkit (or cloud-hypervisor) VMM.")
    parser.add_argument("--version", action="version", version=f"vmmkit-remote {__version__}")
    parser.add_argument("--api-socket", required=True, metavar="PATH",
                        help="HTTP API socket path (UNIX domain socket)")
    parser.add_argument("--timeout", type=float, default=75.0, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_method, _endpoint, help_text) in _SIMPLE.items():
        commands.add_parser(name, help=help_text)
    create = commands.add_parser("create", help="Create VM from a JSON configuration")
    create.add_argument("path", nargs="?", default="-", help="the VmConfig JSON file (- for stdin)")
    add_disk = commands.add_parser("add-disk", help="Add block device")
    add_disk.add_argument("disk_config", metavar="DISK", help="as --disk: path=<image>,readonly=on,...")
    add_net = commands.add_parser("add-net", help="Add network device")
    add_net.add_argument("net_config", metavar="NET",
                         help="as --net: tap=<name>|fd=[<fd>,...],mac=...; fds are passed to the VMM")
    add_device = commands.add_parser("add-device", help="Add VFIO device")
    add_device.add_argument("device_config", metavar="DEVICE", help="as --device: path=<sysfs path>,id=<id>")
    add_vsock = commands.add_parser("add-vsock", help="Add vsock device")
    add_vsock.add_argument("vsock_config", metavar="VSOCK", help="as --vsock: cid=<cid>,socket=<path>")
    add_pmem = commands.add_parser("add-pmem", help="Add persistent memory device")
    add_pmem.add_argument("pmem_config", metavar="PMEM", help="as --pmem: file=<path>,size=<size>,discard_writes=on")
    add_generic = commands.add_parser("add-generic-vhost-user", help="Add generic vhost-user device")
    add_generic.add_argument("generic_vhost_user_config", metavar="GENERIC_VHOST_USER",
                             help="as --generic-vhost-user: socket=<path>,virtio_id=<id>,queue_sizes=[..]")
    remove = commands.add_parser("remove-device", help="Remove VFIO and PCI device")
    remove.add_argument("id", help="the device id")
    resize = commands.add_parser("resize", help="Resize the VM")
    resize.add_argument("--cpus", type=int, help="New vCPUs count")
    resize.add_argument("--memory", help="New memory size in bytes (supports K/M/G suffix)")
    resize.add_argument("--balloon", help="New balloon size in bytes (supports K/M/G suffix)")
    resize_disk = commands.add_parser("resize-disk", help="Resize an attached disk")
    resize_disk.add_argument("--disk", required=True, help="Disk identifier")
    resize_disk.add_argument("--size", required=True, help="New disk size (bytes, or with K/M/G/T)")
    resize_zone = commands.add_parser("resize-zone", help="Resize a memory zone")
    resize_zone.add_argument("--id", required=True, help="Memory zone identifier")
    resize_zone.add_argument("--size", required=True, help="New memory zone size in bytes (supports K/M/G suffix)")
    snapshot = commands.add_parser("snapshot", help="Create a snapshot from VM")
    snapshot.add_argument("destination_url", metavar="URL", help="file:///<directory> to write it into")
    restore = commands.add_parser("restore", help="Restore VM from a snapshot")
    restore.add_argument("restore_config", metavar="CONFIG",
                         help="source_url=file:///<directory>,prefault=on|off,resume=on|off")
    send = commands.add_parser("send-migration", help="Initiate a VM migration")
    send.add_argument("destination_url", metavar="URL", help="unix:<socket path> or tcp:<host>:<port>")
    send.add_argument("--local", action="store_true",
                      help="hand guest RAM over as file descriptors (same host, --memory shared=on)")
    receive = commands.add_parser("receive-migration", help="Receive a VM migration")
    receive.add_argument("receiver_url", metavar="URL", help="unix:<socket path> or tcp:<host>:<port>")
    return parser


#: Migration requests answer when the migration is over: the client waits this long.
_MIGRATION_TIMEOUT = 24 * 3600.0


def _restore_body(spec: str) -> dict[str, Any]:
    """``RestoreConfig`` from ch-remote's ``source_url=...,prefault=on`` syntax."""
    from vmmkit.config import ConfigError, OptionParser

    parsed = OptionParser("restore", ("source_url", "prefault", "resume")).parse(spec)
    url = parsed.get("source_url")
    if not url:
        raise ConfigError("restore", spec, "source_url=file:///<directory>", reason="source_url is required")
    body: dict[str, Any] = {"source_url": url}
    for key in ("prefault", "resume"):
        value = parsed.toggle(key)
        if value is not None:
            body[key] = value
    return body


def _device_body(kind: Any, spec: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The JSON body for a device spec, and the fds to send with it (taken out of the body:
    their numbers mean nothing in the VMM's process)."""
    config = kind.parse(spec)
    fds: tuple[int, ...] = tuple(getattr(config, "fds", ()) or ())
    body = config.to_json()
    body.pop("fds", None)
    return body, fds


def main(argv: Sequence[str] | None = None) -> int:
    from vmmkit.api.client import ApiClient, ApiError
    from vmmkit.config import (
        ConfigError,
        DeviceConfig,
        DiskConfig,
        GenericVhostUserConfig,
        NetConfig,
        PmemConfig,
        VsockConfig,
    )
    from vmmkit.units import parse_size

    parser = build_parser()
    options = parser.parse_args(argv)
    client = ApiClient(options.api_socket, timeout=options.timeout)
    command: str = options.command
    fds: tuple[int, ...] = ()
    body: Any = None
    raw: bytes | None = None
    try:
        if command in _SIMPLE:
            method, endpoint, _ = _SIMPLE[command]
        elif command == "create":
            method, endpoint = "PUT", "vm.create"
            raw = _read_input(options.path)
        elif command == "snapshot":
            method, endpoint, body = "PUT", "vm.snapshot", {"destination_url": options.destination_url}
        elif command == "restore":
            method, endpoint, body = "PUT", "vm.restore", _restore_body(options.restore_config)
        elif command in ("send-migration", "receive-migration"):
            from vmmkit.migration.api import receive_migration_args, send_migration_args

            if command == "send-migration":
                body = {"destination_url": options.destination_url, "local": options.local}
                send_migration_args(body)
                method, endpoint = "PUT", "vm.send-migration"
            else:
                body = {"receiver_url": options.receiver_url}
                receive_migration_args(body)
                method, endpoint = "PUT", "vm.receive-migration"
            client.timeout = max(client.timeout, _MIGRATION_TIMEOUT)
        elif command == "remove-device":
            method, endpoint, body = "PUT", "vm.remove-device", {"id": options.id}
        elif command == "resize":
            method, endpoint, body = "PUT", "vm.resize", _resize_body(options)
        elif command == "resize-zone":
            try:
                zone_size = parse_size(options.size)
            except ValueError as exc:
                raise ConfigError("--size", options.size, "a size: bytes, or with a K, M or G suffix",
                                  reason=str(exc)) from None
            method, endpoint, body = "PUT", "vm.resize-zone", {"id": options.id, "desired_ram": zone_size}
        elif command == "resize-disk":
            try:
                size = parse_size(options.size)
            except ValueError as exc:
                raise ConfigError("--size", options.size, "a size: bytes, or with a K, M, G or T suffix",
                                  reason=str(exc)) from None
            method, endpoint, body = "PUT", "vm.resize-disk", {"id": options.disk, "desired_size": size}
        else:
            kinds: dict[str, tuple[str, Any, Callable[[argparse.Namespace], str]]] = {
                "add-disk": ("vm.add-disk", DiskConfig, lambda o: o.disk_config),
                "add-net": ("vm.add-net", NetConfig, lambda o: o.net_config),
                "add-device": ("vm.add-device", DeviceConfig, lambda o: o.device_config),
                "add-vsock": ("vm.add-vsock", VsockConfig, lambda o: o.vsock_config),
                "add-pmem": ("vm.add-pmem", PmemConfig, lambda o: o.pmem_config),
                "add-generic-vhost-user": ("vm.add-generic-vhost-user", GenericVhostUserConfig,
                                           lambda o: o.generic_vhost_user_config),
            }
            endpoint, kind, spec = kinds[command]
            method = "PUT"
            body, fds = _device_body(kind, spec(options))
    except ConfigError as exc:
        print(f"vmmkit-remote: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"vmmkit-remote: error: cannot read {options.path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        response = client.request(method, endpoint, body, fds=fds, raw_body=raw)
    except ApiError as exc:
        print(f"vmmkit-remote: error: {exc.status and f'the VMM answered {exc.status}' or 'no answer'}",
              file=sys.stderr)
        for index, message in enumerate(exc.messages):
            print(f"  {index}: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"vmmkit-remote: error: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    if response.body:
        try:
            print(json.dumps(response.json(), indent=2))
        except ValueError:
            sys.stdout.write(response.body.decode("utf-8", "replace"))
    return 0


def _resize_body(options: argparse.Namespace) -> dict[str, int]:
    """``VmResize`` from ``resize --cpus/--memory/--balloon`` (ch-remote's ``resize``).

    :raises ConfigError: nothing to resize, or a count or size that is not one."""
    from vmmkit.config import ConfigError
    from vmmkit.units import parse_size

    body: dict[str, int] = {}
    if options.cpus is not None:
        if options.cpus < 1:
            raise ConfigError("--cpus", options.cpus, "a vCPU count of at least 1")
        body["desired_vcpus"] = options.cpus
    for option, key, text in (("--memory", "desired_ram", options.memory),
                              ("--balloon", "desired_balloon", options.balloon)):
        if text is not None:
            try:
                body[key] = parse_size(text)
            except ValueError as exc:
                raise ConfigError(option, text, "a size: bytes, or with a K, M, G or T suffix",
                                  reason=str(exc)) from None
    if not body:
        raise ConfigError("resize", "", "at least one of --cpus, --memory, --balloon")
    return body


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as handle:
        return handle.read()


__all__ = ["main", "build_parser"]

if __name__ == "__main__":
    sys.exit(main())
