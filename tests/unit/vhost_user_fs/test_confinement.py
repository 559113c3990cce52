"""The shared directory is the only thing vmmkit-vhost-user fs can reach: hostile names,
symlinks (to ``/``, to ``..``, to a file outside, swapped in after a lookup) and handles of the
wrong kind, sent as raw FUSE requests (what a hostile guest kernel could send; Linux's own
driver never sends ``..``)."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuse_client import Client
from vmmkit_vhost_user import fuse
from vmmkit_vhost_user.fuse import Opcode
from vmmkit_vhost_user.passthrough import check_name

HOSTILE_NAMES = [b"..", b".", b"", b"../outside", b"sub/../..", b"/", b"/etc/passwd", b"a/b"]


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """tmp/outside/secret.txt, tmp/share/{hello.txt, sub/, to-root -> /, up -> .., secret ->
    ../outside/secret.txt, outside -> ../outside}."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret\n")
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello\n")
    (share / "sub").mkdir()
    os.symlink("/", share / "to-root")
    os.symlink("..", share / "up")
    os.symlink("../outside/secret.txt", share / "secret")
    os.symlink("../outside", share / "outside")
    return tmp_path


@pytest.fixture
def client(layout: Path) -> Iterator[Client]:
    from vmmkit_vhost_user.passthrough import PassthroughFs

    fs = PassthroughFs(str(layout / "share"))
    c = Client(fs)
    c.init()
    yield c
    fs.close()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_check_name_refuses_anything_but_one_component(name: bytes) -> None:
    with pytest.raises(fuse.FuseError) as info:
        check_name(name)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_every_name_taking_operation_refuses_hostile_names(client: Client, layout: Path, name: bytes) -> None:
    z = name + b"\0"
    requests = [
        (Opcode.LOOKUP, z),
        (Opcode.MKDIR, struct.pack("<II", 0o755, 0) + z),
        (Opcode.CREATE, struct.pack("<IIII", os.O_CREAT | os.O_RDWR, 0o644, 0, 0) + z),
        (Opcode.UNLINK, z),
        (Opcode.RMDIR, z),
        (Opcode.SYMLINK, z + b"target\0"),
        (Opcode.RENAME, struct.pack("<Q", fuse.ROOT_ID) + b"hello.txt\0" + z),
        (Opcode.RENAME, struct.pack("<Q", fuse.ROOT_ID) + z + b"moved\0"),
        (Opcode.RENAME2, fuse.RENAME2_IN.pack(fuse.ROOT_ID, 0, 0) + b"hello.txt\0" + z),
        (Opcode.LINK, struct.pack("<Q", fuse.ROOT_ID) + z),
    ]
    before = sorted(p.name for p in layout.rglob("*"))
    for opcode, body in requests:
        assert client.call(opcode, fuse.ROOT_ID, body)[0] == errno.EINVAL, Opcode(opcode).name
    assert sorted(p.name for p in layout.rglob("*")) == before


def test_a_name_with_a_nul_inside_ends_at_the_nul(client: Client, layout: Path) -> None:
    # "hello.txt\0../x": the name is "hello.txt"; what follows is not a path component.
    node, _ = client.lookup(fuse.ROOT_ID, b"hello.txt\0/../outside")
    assert node > fuse.ROOT_ID


@pytest.mark.parametrize("link", [b"to-root", b"up", b"outside"])
def test_a_symlink_is_its_own_inode_and_never_a_directory_on_the_host(client: Client, link: bytes) -> None:
    node, mode = client.lookup(fuse.ROOT_ID, link)
    assert mode & 0o170000 == 0o120000  # S_IFLNK: the link itself, not its target
    # Looking names up "inside" it would follow it on the host: refused.
    for name in (b"etc", b"secret.txt", b"share"):
        assert client.call(Opcode.LOOKUP, node, name + b"\0")[0] == errno.ENOTDIR
    assert client.call(Opcode.OPENDIR, node, struct.pack("<II", 0, 0))[0] == errno.ENOTDIR
    assert client.call(Opcode.CREATE, node, struct.pack("<IIII", os.O_CREAT | os.O_RDWR, 0o644, 0, 0)
                       + b"planted\0")[0] == errno.ENOTDIR
    assert client.call(Opcode.MKDIR, node, struct.pack("<II", 0o755, 0) + b"planted\0")[0] == errno.ENOTDIR


def test_opening_a_symlink_to_a_file_outside_is_refused(client: Client, layout: Path) -> None:
    node, _ = client.lookup(fuse.ROOT_ID, b"secret")
    assert client.call(Opcode.OPEN, node, struct.pack("<II", os.O_RDONLY, 0))[0] == errno.ELOOP
    assert client.call(Opcode.OPEN, node, struct.pack("<II", os.O_WRONLY | os.O_TRUNC, 0))[0] == errno.ELOOP
    size = fuse.SETATTR_IN.pack(fuse.FATTR_SIZE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    assert client.call(Opcode.SETATTR, node, size)[0] == errno.EOPNOTSUPP
    mode = fuse.SETATTR_IN.pack(fuse.FATTR_MODE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0o777, 0, 0, 0, 0)
    assert client.call(Opcode.SETATTR, node, mode)[0] == errno.EOPNOTSUPP
    assert client.call(Opcode.LINK, fuse.ROOT_ID, struct.pack("<Q", node) + b"hard\0")[0] == 0
    assert os.path.islink(layout / "share" / "hard")  # a link to the symlink, not to the secret
    assert (layout / "outside" / "secret.txt").read_text() == "secret\n"
    assert (layout / "outside" / "secret.txt").stat().st_nlink == 1


def test_create_through_an_existing_symlink_does_not_write_outside(client: Client, layout: Path) -> None:
    body = struct.pack("<IIII", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, 0, 0) + b"secret\0"
    assert client.call(Opcode.CREATE, fuse.ROOT_ID, body)[0] == errno.ELOOP
    assert (layout / "outside" / "secret.txt").read_text() == "secret\n"


def test_a_directory_swapped_for_a_symlink_after_lookup_keeps_pointing_inside(client: Client,
                                                                              layout: Path) -> None:
    share = layout / "share"
    sub, _ = client.lookup(fuse.ROOT_ID, b"sub")
    os.rename(share / "sub", share / "sub-moved")
    os.symlink("../outside", share / "sub")  # a host-side race: the name now leads outside
    assert client.call(Opcode.LOOKUP, sub, b"secret.txt\0")[0] == errno.ENOENT
    client.create(sub, b"made.txt", os.O_WRONLY)
    assert (share / "sub-moved" / "made.txt").exists()
    assert sorted(p.name for p in (layout / "outside").iterdir()) == ["secret.txt"]


def test_rename_and_unlink_act_on_the_symlink_not_its_target(client: Client, layout: Path) -> None:
    client.ok(Opcode.RENAME, fuse.ROOT_ID, struct.pack("<Q", fuse.ROOT_ID) + b"secret\0renamed\0")
    client.ok(Opcode.UNLINK, fuse.ROOT_ID, b"renamed\0")
    client.ok(Opcode.UNLINK, fuse.ROOT_ID, b"to-root\0")
    assert (layout / "outside" / "secret.txt").read_text() == "secret\n"
    assert os.path.isdir("/proc")


def test_an_unknown_node_id_is_refused(client: Client) -> None:
    for node in (0, 2, 12345, (1 << 64) - 1):
        assert client.call(Opcode.LOOKUP, node, b"hello.txt\0")[0] == errno.EBADF
        assert client.call(Opcode.GETATTR, node, bytes(16))[0] == errno.EBADF
