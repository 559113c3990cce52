"""Builds FUSE requests as Linux's virtio-fs driver sends them (``include/uapi/linux/fuse.h``)
and decodes the replies, for the unit tests of :mod:`vmmkit_vhost_user.passthrough`."""

from __future__ import annotations

import itertools
import struct

from vmmkit_vhost_user import fuse
from vmmkit_vhost_user.fuse import Opcode
from vmmkit_vhost_user.passthrough import PassthroughFs

ROOM = 1 << 21  #: the writable bytes a request's chain offers unless a test says otherwise


class Client:
    """Talks to a :class:`PassthroughFs` as the guest's kernel would."""

    def __init__(self, fs: PassthroughFs) -> None:
        self.fs = fs
        self._unique = itertools.count(2, 2)

    uid = 0  #: the caller every request claims to come from
    gid = 0

    def raw(self, opcode: int, nodeid: int, body: bytes = b"", *, room: int = ROOM,
            length: int | None = None) -> bytes | None:
        unique = next(self._unique)
        size = fuse.IN_HEADER.size + len(body)
        header = fuse.IN_HEADER.pack(size if length is None else length, opcode, unique, nodeid, self.uid, self.gid,
                                     1, 0, 0)
        return self.fs.handle(header + body, room)

    def call(self, opcode: int, nodeid: int, body: bytes = b"", *, room: int = ROOM) -> tuple[int, bytes]:
        """(errno, reply body) of one request."""
        out = self.raw(opcode, nodeid, body, room=room)
        assert out is not None, f"{Opcode(opcode).name} got no reply"
        length, error, _unique = fuse.OUT_HEADER.unpack_from(out)
        assert length == len(out)
        return -error, out[fuse.OUT_HEADER.size:]

    def ok(self, opcode: int, nodeid: int, body: bytes = b"", *, room: int = ROOM) -> bytes:
        error, out = self.call(opcode, nodeid, body, room=room)
        assert error == 0, f"{Opcode(opcode).name} failed with errno {error}"
        return out

    def init(self) -> bytes:
        return self.ok(Opcode.INIT, 0, struct.pack("<IIII", 7, 38, 65536, 0xFFFFFFFF) + bytes(48))

    def lookup(self, parent: int, name: bytes) -> tuple[int, int]:
        """(node id, st_mode) of ``name``."""
        out = self.ok(Opcode.LOOKUP, parent, name + b"\0")
        return entry_node(out), entry_mode(out)

    def open(self, node: int, flags: int) -> int:
        return int(struct.unpack_from("<Q", self.ok(Opcode.OPEN, node, struct.pack("<II", flags, 0)))[0])

    def create(self, parent: int, name: bytes, flags: int, mode: int = 0o644) -> tuple[int, int]:
        """(node id, file handle)."""
        out = self.ok(Opcode.CREATE, parent, struct.pack("<IIII", flags, mode, 0o022, 0) + name + b"\0")
        handle = struct.unpack_from("<Q", out, fuse.ENTRY_OUT.size + fuse.ATTR.size)[0]
        return entry_node(out), int(handle)

    def read(self, fh: int, offset: int, size: int, *, room: int = ROOM) -> bytes:
        return self.ok(Opcode.READ, 0, fuse.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), room=room)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        out = self.ok(Opcode.WRITE, 0, fuse.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data)
        return int(fuse.WRITE_OUT.unpack(out)[0])


def entry_node(out: bytes) -> int:
    return int(fuse.ENTRY_OUT.unpack_from(out)[0])


def entry_mode(out: bytes) -> int:
    return int(fuse.ATTR.unpack_from(out, fuse.ENTRY_OUT.size)[9])


def dirents(out: bytes, *, plus: bool) -> list[tuple[bytes, int]]:
    """(name, node id or 0) of each entry of a READDIR(PLUS) reply."""
    names = []
    offset = 0
    while offset < len(out):
        node = 0
        if plus:
            node = entry_node(out[offset:])
            offset += fuse.ENTRY_OUT.size + fuse.ATTR.size
        _ino, _off, namelen, _kind = fuse.DIRENT.unpack_from(out, offset)
        name = out[offset + fuse.DIRENT.size:offset + fuse.DIRENT.size + namelen]
        offset += (fuse.DIRENT.size + namelen + 7) & ~7
        names.append((name, node))
    return names
