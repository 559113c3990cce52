"""``vmmkit-vhost-user``: vmmkit's vhost-user backends as commands.

    vmmkit-vhost-user fs --socket-path /tmp/vfs.sock --shared-dir /srv/share [--tag myfs]
                         [--thread-pool-size N]
    vmmkit-vhost-user blk --socket-path /tmp/blk.sock --blk-file disk.img [--read-only]
                          [--serial S] [--num-queues N] [--image-type raw|qcow2] [--direct]
                          [--thread-pool-size N]
    vmmkit-vhost-user net --socket PATH [--tap NAME] [--queues N] [--ip IP --mask MASK]
                          [--host-mac MAC] [--mtu N]

fs's options follow virtiofsd's (``--socket-path``, ``--shared-dir``, ``--tag``,
``--thread-pool-size``), blk's QEMU's ``contrib/vhost-user-blk`` (``--socket-path``,
``--blk-file``, ``--read-only``), net's Cloud Hypervisor's ``vhost_user_net`` backend's
(``socket``, ``tap``, ``ip``, ``mask``, ``host_mac``, ``mtu``) with QEMU's ``-netdev
vhost-user,queues=N`` (queue pairs); other options are refused, not ignored. The daemon serves one
frontend at a time, accepts the next one when it leaves, and ends on SIGINT or SIGTERM. Usage
errors exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import stat
import sys
from types import FrameType

from vmmkit_vhost_user import __version__
from vmmkit_vhost_user.backend import Backend, Device
from vmmkit_vhost_user.fs import VirtioFs, check_tag

MAX_THREAD_POOL = 256
MAX_QUEUES = 64


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmmkit-vhost-user", description="vmmkit's vhost-user backends")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fs = commands.add_parser("fs", help="a virtio-fs daemon sharing one host directory",
                             description="Serve DIR to a vhost-user-fs frontend (FUSE over virtqueues); "
                                         "nothing outside DIR is reachable.")
    fs.add_argument("--socket-path", required=True, metavar="PATH", help="the vhost-user Unix socket to listen on")
    fs.add_argument("--shared-dir", required=True, metavar="DIR", help="the directory to share")
    fs.add_argument("--tag", help="the tag offered in the device's config space (enables the CONFIG "
                                  "protocol feature, as virtiofsd's --tag)")
    fs.add_argument("--thread-pool-size", type=int, default=0, metavar="N",
                    help="serve requests on N threads (0, the default: on the loop's thread)")
    fs.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")
    blk = commands.add_parser("blk", help="a virtio-blk backend serving one disk image",
                              description="Serve FILE to a vhost-user-blk frontend, with the in-flight record "
                                          "(INFLIGHT_SHMFD) so a restarted daemon resubmits what was in flight.")
    blk.add_argument("--socket-path", required=True, metavar="PATH", help="the vhost-user Unix socket to listen on")
    blk.add_argument("--blk-file", required=True, metavar="FILE", help="the disk image (a raw file by default)")
    blk.add_argument("--read-only", action="store_true", help="open the image read-only (VIRTIO_BLK_F_RO)")
    blk.add_argument("--serial", help="the GET_ID answer (at most 20 bytes)")
    blk.add_argument("--num-queues", type=int, default=1, metavar="N", help="request queues (MQ when > 1)")
    blk.add_argument("--image-type", choices=("raw", "qcow2"), default="raw", help="the image's format")
    blk.add_argument("--direct", action="store_true", help="open the image O_DIRECT")
    blk.add_argument("--thread-pool-size", type=int, default=0, metavar="N",
                     help="serve requests on N threads (0, the default: on the loop's thread)")
    blk.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")
    _net_parser(commands)
    return parser


#: net options peers have that this backend does not implement, and why (refused by name).
NET_REFUSED = {
    "--mac": "the guest's MAC is the frontend's configuration space (QEMU: -device virtio-net-pci,mac=; "
             "vmmkit: --net mac=); --host-mac sets the tap's",
    "--client": "the backend listens; connecting to a frontend that listens (Cloud Hypervisor's client=on, "
                "vmmkit's vhost_mode=server) is not implemented",
    "--queue-size": "the frontend chooses each ring's size (SET_VRING_NUM, up to 32768)",
    "--thread-pool-size": "receive and transmit run on the loop's thread",
    "--num-queues": "the queues come in pairs here: --queues N gives N pairs (QEMU's -netdev vhost-user,queues=N)",
}


def _net_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    net = commands.add_parser("net", help="a virtio-net backend on a tap",
                              description="Serve a tap interface to a vhost-user-net frontend (QEMU's -netdev "
                                          "vhost-user, Cloud Hypervisor's and vmmkit's --net vhost_user=on).")
    net.add_argument("--socket", "--socket-path", dest="socket_path", required=True, metavar="PATH",
                     help="the vhost-user Unix socket to listen on")
    net.add_argument("--tap", metavar="NAME", help="the tap to attach to (created if absent; default: a new vmtapN)")
    net.add_argument("--queues", type=int, default=1, metavar="N",
                     help="queue pairs (QEMU's -netdev vhost-user,queues=N); more than one needs a multi-queue tap")
    net.add_argument("--ip", help="the tap's host-side IPv4 or IPv6 address")
    net.add_argument("--mask", help="the netmask of --ip (IPv6: a prefix length)")
    net.add_argument("--host-mac", metavar="MAC", help="the tap's host-side MAC address")
    net.add_argument("--mtu", type=int, help="the tap's MTU")
    for option in NET_REFUSED:
        net.add_argument(option, dest=f"refused_{option[2:].replace('-', '_')}", nargs="?", const="",
                         default=None, help=argparse.SUPPRESS)
    net.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")


def _net_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Device:
    import ipaddress

    from vmmkit.errors import DeviceError
    from vmmkit_vhost_user.net import MAX_QUEUE_PAIRS, VirtioNet, open_taps

    for option, why in NET_REFUSED.items():
        if getattr(args, f"refused_{option[2:].replace('-', '_')}") is not None:
            parser.error(f"net {option}: not supported: {why}")
    if not 1 <= args.queues <= MAX_QUEUE_PAIRS:
        parser.error(f"--queues {args.queues}: expected 1 to {MAX_QUEUE_PAIRS}")
    if (args.ip is None) != (args.mask is None):
        parser.error("--ip and --mask go together")
    mac = None
    if args.host_mac is not None:
        mac = bytes.fromhex(args.host_mac.replace(":", "")) if _is_mac(args.host_mac) else None
        if mac is None:
            parser.error(f"--host-mac {args.host_mac}: expected six hexadecimal octets (aa:bb:cc:dd:ee:ff)")
    if args.mtu is not None and not 68 <= args.mtu <= 65535:
        parser.error(f"--mtu {args.mtu}: expected 68 to 65535")
    if args.ip is not None:
        try:
            address = ipaddress.ip_address(args.ip)
            if address.version == 4:
                ipaddress.IPv4Address(args.mask)
            elif not 0 <= int(args.mask) <= 128:
                raise ValueError(args.mask)
        except ValueError:
            parser.error(f"--ip {args.ip} --mask {args.mask}: not an address and its netmask")
    try:
        taps = open_taps(args.tap, args.queues)
    except DeviceError as exc:
        parser.error(f"--tap: {exc}")
    tap = taps[0]
    try:
        if mac is not None:
            tap.set_mac(mac)
        if args.mtu is not None:
            tap.set_mtu(args.mtu)
        if args.ip is not None:
            tap.set_address(args.ip, args.mask)
        tap.set_up()
    except OSError as exc:
        for each in taps:
            each.close()
        print(f"vmmkit-vhost-user: tap {tap.name}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(1) from None
    return VirtioNet(taps)


def _is_mac(text: str) -> bool:
    parts = text.split(":")
    return len(parts) == 6 and all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts)


def _device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Device:
    """The device the command serves; a bad option is a usage error (exit 2)."""
    if args.command == "net":
        return _net_device(parser, args)
    if args.command == "blk":
        from vmmkit.errors import DeviceError
        from vmmkit_vhost_user.blk import VirtioBlk

        if not 1 <= args.num_queues <= MAX_QUEUES:
            parser.error(f"--num-queues {args.num_queues}: expected 1 to {MAX_QUEUES}")
        if args.serial is not None and (len(args.serial.encode()) > 20 or "\0" in args.serial):
            parser.error("--serial: at most 20 bytes, no NUL")
        try:
            return VirtioBlk(args.blk_file, readonly=args.read_only, serial=args.serial, num_queues=args.num_queues,
                             image_type=args.image_type.capitalize(), direct=args.direct)
        except DeviceError as exc:
            parser.error(f"--blk-file: {exc}")
    shared_dir = os.path.abspath(args.shared_dir)
    if not os.path.isdir(shared_dir):
        parser.error(f"--shared-dir {args.shared_dir}: not a directory")
    if args.tag is not None:
        try:
            check_tag(args.tag)
        except ValueError as exc:
            parser.error(f"--tag: {exc}")
    return VirtioFs(shared_dir, tag=args.tag)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 <= getattr(args, "thread_pool_size", 0) <= MAX_THREAD_POOL:
        parser.error(f"--thread-pool-size {args.thread_pool_size}: expected 0 to {MAX_THREAD_POOL}")
    device = _device(parser, args)
    try:
        mode = os.lstat(args.socket_path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            parser.error(f"--socket-path {args.socket_path}: exists and is not a socket")
        os.unlink(args.socket_path)  # a stale socket of an earlier run
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)],
                        format="vmmkit-vhost-user: %(message)s", stream=sys.stderr)
    try:
        backend = Backend(device, args.socket_path, thread_pool_size=getattr(args, "thread_pool_size", 0))
    except OSError as exc:
        print(f"vmmkit-vhost-user: {exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        backend.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        backend.serve_forever()
    finally:
        backend.close()
        close = getattr(device, "close", None)
        if close is not None:
            close()
        try:
            os.unlink(args.socket_path)
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
