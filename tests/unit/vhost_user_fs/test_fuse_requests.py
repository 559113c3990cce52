"""FUSE request parsing and the operations of vmmkit-vhost-user's passthrough file system, on
a real temporary directory (requests built as Linux's virtio-fs driver builds them)."""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_client import Client, dirents, entry_node
from vmmkit_vhost_user import fuse
from vmmkit_vhost_user.fuse import FuseError, Opcode, Reader
from vmmkit_vhost_user.passthrough import MAX_WRITE, PassthroughFs


@pytest.fixture
def share(tmp_path: Path) -> Path:
    directory = tmp_path / "share"
    directory.mkdir()
    (directory / "hello.txt").write_bytes(b"hello world\n")
    (directory / "sub").mkdir()
    return directory


@pytest.fixture
def client(share: Path) -> Iterator[Client]:
    fs = PassthroughFs(str(share))
    c = Client(fs)
    c.init()
    yield c
    fs.close()


# -- parsing -------------------------------------------------------------------------------------


def test_a_request_shorter_than_its_header_gets_no_reply(share: Path) -> None:
    fs = PassthroughFs(str(share))
    assert fs.handle(b"\0" * 39, 4096) is None
    assert fs.handle(b"", 4096) is None


@pytest.mark.parametrize("length", [0, 39, 41 + 6])
def test_a_header_length_that_disagrees_with_the_buffer_is_refused(client: Client, length: int) -> None:
    out = client.raw(Opcode.LOOKUP, fuse.ROOT_ID, b"hello.txt\0"[:1], length=length)
    assert out is not None
    assert fuse.OUT_HEADER.unpack_from(out)[1] == -errno.EINVAL


def test_the_header_length_bounds_the_body(client: Client) -> None:
    # "hello.txt\0" is in the buffer, but the header says the body is only "hel": no NUL in it.
    out = client.raw(Opcode.LOOKUP, fuse.ROOT_ID, b"hello.txt\0", length=fuse.IN_HEADER.size + 3)
    assert out is not None and fuse.OUT_HEADER.unpack_from(out)[1] == -errno.EINVAL


def test_reader_refuses_to_read_past_the_body() -> None:
    reader = Reader(b"\1\0\0\0")
    with pytest.raises(FuseError) as info:
        reader.unpack(struct.Struct("<Q"))
    assert info.value.errno == errno.EINVAL
    with pytest.raises(FuseError):
        Reader(b"abc").bytes(4)
    with pytest.raises(FuseError):
        Reader(b"abc").bytes(-1)
    with pytest.raises(FuseError):
        Reader(b"no terminator").name()
    with pytest.raises(FuseError) as info:
        Reader(b"x" * 300 + b"\0").name()
    assert info.value.errno == errno.ENAMETOOLONG


def test_requests_before_init_fail_and_unknown_opcodes_get_enosys(share: Path) -> None:
    fs = PassthroughFs(str(share))
    c = Client(fs)
    assert c.call(Opcode.GETATTR, fuse.ROOT_ID, bytes(16))[0] == errno.EIO
    c.init()
    assert c.call(Opcode.GETATTR, fuse.ROOT_ID, bytes(16))[0] == 0
    assert c.call(Opcode.GETXATTR, fuse.ROOT_ID, bytes(8) + b"user.x\0")[0] == errno.ENOSYS
    assert c.call(9999, fuse.ROOT_ID)[0] == errno.ENOSYS
    assert fs.requests["UNKNOWN(9999)"] == 1


def test_init_negotiates_and_answers_an_old_minor_with_the_old_layout(share: Path) -> None:
    c = Client(PassthroughFs(str(share)))
    out = c.init()
    major, minor, _ra, flags, _bg, _ct, max_write, _tg, max_pages = struct.unpack_from("<IIIIHHIIH", out)
    assert (major, minor, max_write, max_pages) == (7, fuse.KERNEL_MINOR_VERSION, MAX_WRITE, MAX_WRITE // 4096)
    assert flags & fuse.FUSE_DO_READDIRPLUS and len(out) == 64
    old = c.ok(Opcode.INIT, 0, struct.pack("<IIII", 7, 22, 0, 0))
    assert len(old) == 24
    assert c.call(Opcode.INIT, 0, struct.pack("<IIII", 6, 0, 0, 0))[0] == errno.EPROTO


def test_forget_has_no_reply_even_when_malformed(client: Client) -> None:
    node, _ = client.lookup(fuse.ROOT_ID, b"hello.txt")
    assert client.raw(Opcode.FORGET, node, struct.pack("<Q", 1), room=0) is None
    assert client.raw(Opcode.FORGET, node, b"\1", room=0) is None
    # BATCH_FORGET announcing more entries than it carries: refused as a whole, no reply.
    assert client.raw(Opcode.BATCH_FORGET, 0, struct.pack("<II", 0xFFFFFFFF, 0) + bytes(16), room=0) is None


# -- operations ----------------------------------------------------------------------------------


def test_lookup_counts_and_forget_releases(client: Client) -> None:
    node, mode = client.lookup(fuse.ROOT_ID, b"hello.txt")
    again, _ = client.lookup(fuse.ROOT_ID, b"hello.txt")
    assert node == again and stat.S_ISREG(mode)
    client.raw(Opcode.FORGET, node, struct.pack("<Q", 1), room=0)
    assert client.call(Opcode.GETATTR, node, bytes(16))[0] == 0  # one lookup left
    client.raw(Opcode.BATCH_FORGET, 0, struct.pack("<II", 1, 0) + struct.pack("<QQ", node, 1), room=0)
    assert client.call(Opcode.GETATTR, node, bytes(16))[0] == errno.EBADF
    assert client.call(Opcode.LOOKUP, fuse.ROOT_ID, b"missing\0")[0] == errno.ENOENT


def test_create_write_read_fsync_release(client: Client, share: Path) -> None:
    node, fh = client.create(fuse.ROOT_ID, b"new.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    data = os.urandom(200_000)
    assert client.write(fh, 0, data) == len(data)
    assert client.write(fh, len(data), b"tail") == 4
    assert client.read(fh, 0, 10) == data[:10]
    assert client.read(fh, len(data), 100) == b"tail"
    assert len(client.read(fh, 0, 1 << 20, room=fuse.OUT_HEADER.size + 1000)) == 1000  # the chain's room
    client.ok(Opcode.FSYNC, node, fuse.FSYNC_IN.pack(fh, 0, 0))
    client.ok(Opcode.FLUSH, node, fuse.FLUSH_IN.pack(fh, 0, 0, 0))
    client.ok(Opcode.RELEASE, node, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    assert client.call(Opcode.READ, node, fuse.READ_IN.pack(fh, 0, 1, 0, 0, 0, 0))[0] == errno.EBADF
    assert (share / "new.bin").read_bytes() == data + b"tail"
    assert (share / "new.bin").stat().st_mode & 0o777 == 0o644
    assert client.call(Opcode.CREATE, fuse.ROOT_ID, struct.pack("<IIII", os.O_CREAT | os.O_EXCL | os.O_RDWR,
                                                                0o644, 0, 0) + b"new.bin\0")[0] == errno.EEXIST


def test_write_lengths_are_checked(client: Client, share: Path) -> None:
    _, fh = client.create(fuse.ROOT_ID, b"w", os.O_RDWR)
    short = fuse.WRITE_IN.pack(fh, 0, 100, 0, 0, 0, 0) + b"x" * 10  # announces 100, carries 10
    assert client.call(Opcode.WRITE, 0, short)[0] == errno.EINVAL
    huge = fuse.WRITE_IN.pack(fh, 0, MAX_WRITE + 1, 0, 0, 0, 0)
    assert client.call(Opcode.WRITE, 0, huge)[0] == errno.EINVAL
    assert client.call(Opcode.WRITE, 0, fuse.WRITE_IN.pack(fh, 1 << 63, 1, 0, 0, 0, 0) + b"x")[0] == errno.EINVAL
    assert (share / "w").read_bytes() == b""


def test_setattr_size_mode_and_times(client: Client, share: Path) -> None:
    node, _ = client.lookup(fuse.ROOT_ID, b"hello.txt")
    valid = fuse.FATTR_SIZE | fuse.FATTR_MODE | fuse.FATTR_MTIME | fuse.FATTR_ATIME
    body = fuse.SETATTR_IN.pack(valid, 0, 0, 5, 0, 1000, 981173106, 0, 0, 7, 0, 0o600, 0, 0, 0, 0)
    out = client.ok(Opcode.SETATTR, node, body)
    assert fuse.ATTR.unpack_from(out, fuse.ATTR_OUT.size)[1] == 5
    st = (share / "hello.txt").stat()
    assert (st.st_size, st.st_mode & 0o777, st.st_mtime_ns, st.st_atime_ns) == (5, 0o600, 981173106_000000007,
                                                                                1000 * 10**9)
    bad = fuse.SETATTR_IN.pack(fuse.FATTR_MTIME, 0, 0, 0, 0, 0, 0, 0, 0, 10**9, 0, 0, 0, 0, 0, 0)
    assert client.call(Opcode.SETATTR, node, bad)[0] == errno.EINVAL


def test_directories_and_names(client: Client, share: Path) -> None:
    sub = client.lookup(fuse.ROOT_ID, b"sub")[0]
    client.ok(Opcode.MKDIR, sub, struct.pack("<II", 0o755, 0o022) + b"d\0")
    assert (share / "sub" / "d").is_dir()
    _, fh = client.create(sub, b"f", os.O_WRONLY)
    client.ok(Opcode.RELEASE, 0, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    client.ok(Opcode.RENAME, sub, struct.pack("<Q", fuse.ROOT_ID) + b"f\0g\0")
    assert (share / "g").is_file() and not (share / "sub" / "f").exists()
    (share / "sub" / "h").write_text("h")
    assert client.call(Opcode.RENAME2, fuse.ROOT_ID, fuse.RENAME2_IN.pack(sub, fuse.RENAME_NOREPLACE, 0)
                       + b"g\0h\0")[0] == errno.EEXIST
    client.ok(Opcode.RENAME2, fuse.ROOT_ID, fuse.RENAME2_IN.pack(sub, fuse.RENAME_EXCHANGE, 0) + b"g\0h\0")
    assert (share / "g").read_text() == "h" and (share / "sub" / "h").read_text() == ""
    assert client.call(Opcode.RENAME2, fuse.ROOT_ID, fuse.RENAME2_IN.pack(sub, 1 << 7, 0) + b"g\0h\0")[0] == \
        errno.EINVAL
    client.ok(Opcode.UNLINK, fuse.ROOT_ID, b"g\0")
    assert client.call(Opcode.RMDIR, fuse.ROOT_ID, b"sub\0")[0] == errno.ENOTEMPTY
    client.ok(Opcode.RMDIR, sub, b"d\0")
    assert not (share / "g").exists() and not (share / "sub" / "d").exists()
    out = client.ok(Opcode.STATFS, fuse.ROOT_ID)
    assert len(out) == fuse.KSTATFS.size and fuse.KSTATFS.unpack(out)[5] > 0


@pytest.mark.parametrize("plus", [False, True])
def test_readdir_in_pieces(client: Client, share: Path, plus: bool) -> None:
    names = {f"file-{i:03d}".encode() for i in range(50)}
    for name in names:
        (share / "sub" / name.decode()).write_bytes(b"")
    sub = client.lookup(fuse.ROOT_ID, b"sub")[0]
    fh = int(struct.unpack_from("<Q", client.ok(Opcode.OPENDIR, sub, struct.pack("<II", 0, 0)))[0])
    seen: list[tuple[bytes, int]] = []
    offset = 0
    opcode = Opcode.READDIRPLUS if plus else Opcode.READDIR
    while True:
        out = client.ok(opcode, sub, fuse.READ_IN.pack(fh, offset, 700, 0, 0, 0, 0))
        if not out:
            break
        assert len(out) <= 700
        batch = dirents(out, plus=plus)
        seen += batch
        offset += len(batch)
    assert {name for name, _ in seen} == names | {b".", b".."}
    if plus:
        nodes = {name: node for name, node in seen}
        assert nodes[b"."] == nodes[b".."] == 0  # no lookup counted for these
        assert all(nodes[name] > fuse.ROOT_ID for name in names)
    client.ok(Opcode.FSYNCDIR, sub, fuse.FSYNC_IN.pack(fh, 0, 0))
    client.ok(Opcode.RELEASEDIR, sub, fuse.RELEASE_IN.pack(fh, 0, 0, 0))
    assert client.call(Opcode.RELEASEDIR, sub, fuse.RELEASE_IN.pack(fh, 0, 0, 0))[0] == errno.EBADF


def test_symlink_readlink_and_link(client: Client, share: Path) -> None:
    out = client.ok(Opcode.SYMLINK, fuse.ROOT_ID, b"link\0/etc/shadow\0")
    link = entry_node(out)
    assert os.readlink(share / "link") == "/etc/shadow"  # data: the guest resolves it, never the host
    assert client.ok(Opcode.READLINK, link) == b"/etc/shadow"
    hello = client.lookup(fuse.ROOT_ID, b"hello.txt")[0]
    assert client.call(Opcode.READLINK, hello)[0] == errno.EINVAL
    client.ok(Opcode.LINK, fuse.ROOT_ID, struct.pack("<Q", hello) + b"hard\0")
    assert (share / "hard").stat().st_ino == (share / "hello.txt").stat().st_ino
    sub = client.lookup(fuse.ROOT_ID, b"sub")[0]
    assert client.call(Opcode.LINK, fuse.ROOT_ID, struct.pack("<Q", sub) + b"dirlink\0")[0] == errno.EPERM


def test_destroy_forgets_everything(client: Client) -> None:
    node, _ = client.lookup(fuse.ROOT_ID, b"hello.txt")
    fh = client.open(node, os.O_RDONLY)
    client.ok(Opcode.DESTROY, 0)
    client.init()
    assert client.call(Opcode.GETATTR, node, bytes(16))[0] == errno.EBADF
    assert client.call(Opcode.READ, 0, fuse.READ_IN.pack(fh, 0, 1, 0, 0, 0, 0))[0] == errno.EBADF


def test_syncfs(client: Client) -> None:
    client.ok(Opcode.SYNCFS, fuse.ROOT_ID, bytes(8))
    assert client.call(Opcode.SYNCFS, fuse.ROOT_ID, b"")[0] == errno.EINVAL


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root daemon creates files as the guest's caller")
def test_a_root_daemon_creates_as_the_guest_caller(client: Client, share: Path) -> None:
    os.chmod(share, 0o777)
    client.uid, client.gid = 1234, 5678
    client.create(fuse.ROOT_ID, b"file", os.O_WRONLY)
    client.ok(Opcode.MKDIR, fuse.ROOT_ID, struct.pack("<II", 0o755, 0) + b"dir\0")
    client.ok(Opcode.SYMLINK, fuse.ROOT_ID, b"link\0target\0")
    for name in ("file", "dir", "link"):
        st = os.lstat(share / name)
        assert (st.st_uid, st.st_gid) == (1234, 5678), name
    # The caller's permissions apply on the host too: 1234 may not write into "sub" (root's, 0755).
    assert client.call(Opcode.CREATE, client.lookup(fuse.ROOT_ID, b"sub")[0],
                       struct.pack("<IIII", os.O_WRONLY, 0o644, 0, 0) + b"x\0")[0] == errno.EACCES
    assert os.getresuid() == (0, 0, 0)  # the daemon's own credentials are back
    (share / "after").write_text("root again")
    assert os.stat(share / "after").st_uid == 0
