"""The FUSE wire protocol as virtio-fs carries it: opcodes, structures and request parsing.

Layouts follow Linux's ``include/uapi/linux/fuse.h`` (protocol 7.31+; Linux 6.1 speaks 7.37).
Over virtio-fs (``fs/fuse/virtio_fs.c``) one request is one descriptor chain: the
device-readable part holds ``fuse_in_header`` and the operation's input, the device-writable
part receives ``fuse_out_header`` and the output. A FORGET (on the hiprio queue) has no
writable part and gets no reply.

Everything here is guest-controlled: :func:`parse_request` checks the header's length
against the bytes the chain really carries, and :class:`Reader` refuses any read past the
request, a name without its NUL or with a NUL inside (:class:`FuseError` with ``EINVAL``).
"""

from __future__ import annotations

import enum
import errno
import struct
from typing import Final

from attrs import frozen

#: The protocol this daemon implements (its ``fuse_init_out``).
KERNEL_VERSION: Final = 7
KERNEL_MINOR_VERSION: Final = 31
ROOT_ID: Final = 1  #: ``FUSE_ROOT_ID``


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


# fuse_init_in.flags / fuse_init_out.flags
FUSE_ASYNC_READ: Final = 1 << 0
FUSE_ATOMIC_O_TRUNC: Final = 1 << 3
FUSE_BIG_WRITES: Final = 1 << 5
FUSE_DO_READDIRPLUS: Final = 1 << 13
FUSE_READDIRPLUS_AUTO: Final = 1 << 14
FUSE_PARALLEL_DIROPS: Final = 1 << 18
FUSE_MAX_PAGES: Final = 1 << 22

# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_ATIME: Final = 1 << 4
FATTR_MTIME: Final = 1 << 5
FATTR_FH: Final = 1 << 6
FATTR_ATIME_NOW: Final = 1 << 7
FATTR_MTIME_NOW: Final = 1 << 8
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_CTIME: Final = 1 << 10
FATTR_KILL_SUIDGID: Final = 1 << 11

FUSE_FSYNC_FDATASYNC: Final = 1 << 0
RENAME_NOREPLACE: Final = 1 << 0
RENAME_EXCHANGE: Final = 1 << 1
RENAME_WHITEOUT: Final = 1 << 2

IN_HEADER = struct.Struct("<IIQQIIIHH")  #: fuse_in_header: len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")  #: fuse_out_header: len error unique
INIT_IN = struct.Struct("<IIII")  #: major minor max_readahead flags (flags2 and unused follow since 7.36)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  #: 64 bytes since 7.23
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  #: fuse_attr: 88 bytes
ENTRY_OUT = struct.Struct("<QQQQII")  #: fuse_entry_out before its fuse_attr
ATTR_OUT = struct.Struct("<QII")  #: fuse_attr_out before its fuse_attr
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  #: 88 bytes
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
CREATE_IN = struct.Struct("<IIII")  #: flags mode umask open_flags
MKDIR_IN = struct.Struct("<II")  #: mode umask
MKNOD_IN = struct.Struct("<IIII")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QQIIQII")  #: fh offset size read_flags lock_owner flags padding
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_OUT = struct.Struct("<II")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
FSYNC_IN = struct.Struct("<QII")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
SYNCFS_IN = struct.Struct("<Q")  #: padding
KSTATFS = struct.Struct("<QQQQQIIII24x")  #: fuse_kstatfs: 80 bytes
DIRENT = struct.Struct("<QQII")  #: fuse_dirent before its name (padded to 8 bytes)

#: The largest name a request may carry (Linux's NAME_MAX; the kernel checks it too).
NAME_MAX: Final = 255
#: The largest path (a symlink's target).
PATH_MAX: Final = 4096


class FuseError(Exception):
    """A request fails with ``-errno`` in its reply."""

    def __init__(self, error: int, message: str = "") -> None:
        self.errno = error
        super().__init__(message or errno.errorcode.get(error, str(error)))


@frozen
class InHeader:
    length: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


class Reader:
    """Sequential, bounds-checked reads of a request's body (after its header)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        if layout.size > len(self._data) - self._offset:
            raise FuseError(errno.EINVAL, f"request body too short for a {layout.size}-byte structure")
        values = layout.unpack_from(self._data, self._offset)
        self._offset += layout.size
        return values

    def name(self, limit: int = NAME_MAX) -> bytes:
        """A NUL-terminated string of at most ``limit`` bytes (the NUL not counted)."""
        end = self._data.find(b"\0", self._offset, self._offset + limit + 1)
        if end < 0:
            raise FuseError(errno.EINVAL if len(self._data) - self._offset <= limit else errno.ENAMETOOLONG,
                            "name without its NUL terminator")
        value = self._data[self._offset:end]
        self._offset = end + 1
        return value

    def bytes(self, length: int) -> bytes:
        if length < 0 or length > len(self._data) - self._offset:
            raise FuseError(errno.EINVAL, f"request body shorter than the {length} bytes it announces")
        value = self._data[self._offset:self._offset + length]
        self._offset += length
        return value

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset


def parse_request(data: bytes) -> tuple[InHeader, Reader]:
    """The header and a reader over the body of one request (the chain's readable bytes).

    :raises FuseError: the header is short or its length disagrees with the buffer.
    """
    if len(data) < IN_HEADER.size:
        raise FuseError(errno.EINVAL, f"request of {len(data)} bytes is shorter than fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, _extlen, _pad = IN_HEADER.unpack_from(data)
    if not IN_HEADER.size <= length <= len(data):
        raise FuseError(errno.EINVAL, f"fuse_in_header.len {length} does not fit the {len(data)}-byte request")
    header = InHeader(length, opcode, unique, nodeid, uid, gid, pid)
    return header, Reader(data[IN_HEADER.size:length])


def reply(unique: int, body: bytes = b"", error: int = 0) -> bytes:
    """A reply: ``fuse_out_header`` (``error`` is a positive errno, sent negated) and body."""
    if error:
        body = b""
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body


def dirent(ino: int, offset: int, kind: int, name: bytes) -> bytes:
    """One ``fuse_dirent``, padded to 8 bytes (``FUSE_DIRENT_ALIGN``)."""
    raw = DIRENT.pack(ino, offset, len(name), kind) + name
    return raw + b"\0" * (-len(raw) % 8)
