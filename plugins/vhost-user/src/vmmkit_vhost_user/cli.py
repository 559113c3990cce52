"""``vmmkit-vhost-user``: vmmkit's vhost-user backends as commands.

    vmmkit-vhost-user fs --socket-path /tmp/vfs.sock --shared-dir /srv/share [--tag myfs]
                         [--thread-pool-size N]
    vmmkit-vhost-user blk --socket-path /tmp/blk.sock --blk-file disk.img [--read-only]
                          [--serial S] [--num-queues N] [--image-type raw|qcow2] [--direct]
                          [--thread-pool-size N]

fs's options follow virtiofsd's (``--socket-path``, ``--shared-dir``, ``--tag``,
``--thread-pool-size``), blk's QEMU's ``contrib/vhost-user-blk`` (``--socket-path``,
``--blk-file``, ``--read-only``); other options are refused, not ignored. The daemon serves one
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
    return parser


def _device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Device:
    """The device the command serves; a bad option is a usage error (exit 2)."""
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
    if not 0 <= args.thread_pool_size <= MAX_THREAD_POOL:
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
        backend = Backend(device, args.socket_path, thread_pool_size=args.thread_pool_size)
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
