"""``vmmkit-vhost-user``: vmmkit's vhost-user backends as commands.

    vmmkit-vhost-user fs --socket-path /tmp/vfs.sock --shared-dir /srv/share [--tag myfs]
                         [--thread-pool-size N]

The options follow virtiofsd's (``--socket-path``, ``--shared-dir``, ``--tag``,
``--thread-pool-size``); virtiofsd's other options are refused, not ignored. The daemon
serves one frontend at a time, accepts the next one when it leaves, and ends on SIGINT or
SIGTERM. Usage errors exit with status 2.
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
from vmmkit_vhost_user.backend import Backend
from vmmkit_vhost_user.fs import VirtioFs, check_tag

MAX_THREAD_POOL = 256


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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    shared_dir = os.path.abspath(args.shared_dir)
    if not os.path.isdir(shared_dir):
        parser.error(f"--shared-dir {args.shared_dir}: not a directory")
    if not 0 <= args.thread_pool_size <= MAX_THREAD_POOL:
        parser.error(f"--thread-pool-size {args.thread_pool_size}: expected 0 to {MAX_THREAD_POOL}")
    if args.tag is not None:
        try:
            check_tag(args.tag)
        except ValueError as exc:
            parser.error(f"--tag: {exc}")
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
        device = VirtioFs(shared_dir, tag=args.tag)
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
        try:
            os.unlink(args.socket_path)
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
