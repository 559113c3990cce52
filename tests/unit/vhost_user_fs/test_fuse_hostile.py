"""Hostile FUSE requests in bulk (hypothesis): whatever sequence of requests a guest sends,
the passthrough file system answers each with a well-formed reply (or none, for FORGET),
raises nothing, and changes nothing outside the shared directory. Node ids of later requests
are drawn from those earlier replies handed out, so sequences reach past LOOKUP.

This is a robustness test: a random search rarely hits the one LOOKUP of ``..`` an escape
would start with, so the confinement rules themselves are pinned case by case in
``test_confinement.py`` (which fails if ``..`` is let through)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from vmmkit_vhost_user import fuse
from vmmkit_vhost_user.fuse import Opcode
from vmmkit_vhost_user.passthrough import PassthroughFs

NAMES = [b"hello.txt", b"sub", b"..", b".", b"", b"/", b"../outside", b"escape", b"new", b"x" * 300]
#: Every opcode, and the ones that take names (where an escape would start) many times over.
NAME_OPS = [Opcode.LOOKUP, Opcode.MKDIR, Opcode.CREATE, Opcode.UNLINK, Opcode.RMDIR, Opcode.SYMLINK]
OPCODES = [op for op in Opcode if op not in (Opcode.INIT, Opcode.DESTROY)] + [0, 99, 0xFFFFFFFF] + NAME_OPS * 8
#: Opcodes whose reply starts with a fuse_entry_out (a node id to use later).
ENTRY_REPLIES = {Opcode.LOOKUP, Opcode.MKDIR, Opcode.CREATE, Opcode.SYMLINK, Opcode.LINK}


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Everything under ``directory`` but its ``share``."""
    out = {}
    for path in sorted(directory.rglob("*")):
        if path.relative_to(directory).parts[0] == "share":
            continue
        st_ = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        out[str(path.relative_to(directory))] = (st_.st_mode, st_.st_mtime_ns, data)
    return out


def make_world(root: Path) -> PassthroughFs:
    (root / "outside").mkdir()
    (root / "outside" / "secret.txt").write_text("secret\n")
    share = root / "share"
    share.mkdir()
    (share / "hello.txt").write_text("hello\n")
    (share / "sub").mkdir()
    os.symlink("../outside", share / "escape")
    fs = PassthroughFs(str(share))
    body = struct.pack("<IIII", 7, 38, 0, 0xFFFFFFFF) + bytes(48)
    fs.handle(fuse.IN_HEADER.pack(40 + len(body), Opcode.INIT, 1, 0, 0, 0, 0, 0, 0) + body, 4096)
    return fs


def body_strategy() -> st.SearchStrategy[bytes]:
    name = st.sampled_from(NAMES).map(lambda n: n + b"\0")
    mkdir = name.map(lambda n: struct.pack("<II", 0o755, 0) + n)
    number = st.sampled_from([0, 1, 2, 3, 7, 0o644, 0xFFFF, 1 << 31, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
    word = number.map(lambda v: struct.pack("<Q", v))
    flags = st.sampled_from([os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_TRUNC, os.O_RDONLY]).map(
        lambda f: struct.pack("<IIII", f, 0o644, 0, 0))
    piece = st.one_of(name, word, flags, st.binary(max_size=64))
    return st.one_of(name, mkdir, st.tuples(flags, name).map(b"".join), st.lists(piece, max_size=6).map(b"".join))


step = st.tuples(st.sampled_from(OPCODES), st.integers(0, 7), body_strategy(),
                 st.sampled_from([0, 0, 0, -1, 1, -40, 1 << 20]), st.sampled_from([0, 16, 17, 100, 4096, 1 << 21]))


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=8))
def test_hostile_request_sequences_get_well_formed_replies_and_stay_inside(
        steps: list[tuple[int, int, bytes, int, int]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="vmmkit-fuse-hostile-"))
    try:
        fs = make_world(root)
        before = snapshot(root)
        nodes = [fuse.ROOT_ID, 0, 1 << 63]
        for opcode, pick, body, length_delta, room in steps:
            nodeid = nodes[pick % len(nodes)]
            length = max(0, min(40 + len(body) + length_delta, 0xFFFFFFFF))
            reply = fs.handle(fuse.IN_HEADER.pack(length, opcode, 77, nodeid, 0, 0, 0, 0, 0) + body, room)
            if reply is None:
                assert opcode in (Opcode.FORGET, Opcode.BATCH_FORGET)
                continue
            size, error, unique = fuse.OUT_HEADER.unpack_from(reply)
            assert size == len(reply) and unique == 77 and -4095 <= error <= 0
            if opcode in (Opcode.READ, Opcode.READDIR, Opcode.READDIRPLUS) and error == 0:
                assert len(reply) <= max(room, fuse.OUT_HEADER.size)
            if opcode in ENTRY_REPLIES and error == 0:
                nodes.append(fuse.ENTRY_OUT.unpack_from(reply, fuse.OUT_HEADER.size)[0])
        fs.close()
        assert snapshot(root) == before
    finally:
        shutil.rmtree(root)
