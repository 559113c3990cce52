"""A passthrough FUSE file system confined to one host directory (virtiofsd's ``passthrough``).

Confinement, as in virtiofsd: every inode the guest knows is an ``O_PATH`` file descriptor
(the shared directory's own is node 1), and every name the guest sends is one path component
resolved with ``openat``-family calls relative to its parent's descriptor, never a path:

* names are refused (``EINVAL``) if empty, ``.``, ``..``, or containing ``/`` or NUL;
* the last component is opened with ``O_NOFOLLOW``: a symlink in the share is an inode of its
  own (the guest's kernel resolves its target in the *guest's* namespace, READLINK returns it
  as data) and is never followed on the host;
* an inode is reopened for I/O through ``/proc/self/fd/N``, which names that very inode
  (symlink inodes are refused with ``ELOOP``, so a magic link never leads anywhere else);
* no absolute path and no ``..`` ever reaches a host system call.

Node ids are this daemon's own counter (not host pointers); a lookup of an inode already
known (same ``st_dev``/``st_ino``) returns the same node id and adds to its lookup count, and
FORGET/BATCH_FORGET close the descriptor when the count reaches zero, as the FUSE protocol
prescribes. File handles are plain descriptors kept in a table under their own ids.

A root daemon creates files, directories and symlinks with the guest caller's uid and gid
(``setfsuid``/``setfsgid`` around the call, :func:`vmmkit_vhost_user.hostcalls.as_caller`); any
other daemon creates them as itself. Permission checks are the guest kernel's (virtio-fs mounts
with ``default_permissions``).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import Final

from attrs import define

from vmmkit_vhost_user import fuse, hostcalls
from vmmkit_vhost_user.fuse import FuseError, InHeader, Opcode, Reader

#: How long the guest may cache entries and attributes (virtiofsd's ``--cache auto``: 1 s).
TIMEOUT_SECONDS: Final = 1
#: The largest WRITE the daemon accepts and the largest READ it serves (``max_write``).
MAX_WRITE: Final = 1 << 20
MAX_PAGES: Final = MAX_WRITE // 4096
#: Flags of OPEN/CREATE passed to the host; the rest (O_CREAT, O_EXCL, O_NOCTTY...) dropped.
_OPEN_FLAGS: Final = (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_TRUNC
                      | os.O_DIRECTORY | os.O_NOATIME)
_AT_EMPTY_PATH: Final = 0x1000

Handler = Callable[[InHeader, Reader, int], bytes | None]


@define(eq=False)
class Inode:
    fd: int  #: an O_PATH descriptor
    key: tuple[int, int]  #: (st_dev, st_ino)
    kind: int  #: stat.S_IFMT of the mode
    lookups: int


@define(eq=False)
class DirHandle:
    fd: int
    entries: list[tuple[bytes, int, int]] | None = None  #: (name, ino, dirent type), "." and ".." first


def check_name(name: bytes) -> str:
    """One path component from the guest, or ``EINVAL``/``ENAMETOOLONG`` (see the module)."""
    if name in (b"", b".", b"..") or b"/" in name or b"\0" in name:
        raise FuseError(errno.EINVAL, f"refused name {name!r}")
    if len(name) > fuse.NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG)
    return os.fsdecode(name)


class PassthroughFs:
    """The FUSE operations over ``shared_dir``; :meth:`handle` turns one request into its reply."""

    def __init__(self, shared_dir: str) -> None:
        fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self._lock = threading.Lock()
        self._root = Inode(fd, (st.st_dev, st.st_ino), stat.S_IFDIR, 2)
        self._inodes: dict[int, Inode] = {fuse.ROOT_ID: self._root}
        self._by_key: dict[tuple[int, int], int] = {self._root.key: fuse.ROOT_ID}
        self._next_node = fuse.ROOT_ID + 1
        self._files: dict[int, int] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._next_handle = 1
        self.initialized = False
        self.max_readahead = 0
        #: Requests seen, by opcode name (``UNKNOWN(n)`` for opcodes without a name).
        self.requests: Counter[str] = Counter()
        self.handlers: dict[int, Handler] = {
            Opcode.INIT: self.init, Opcode.DESTROY: self.destroy, Opcode.LOOKUP: self.lookup,
            Opcode.FORGET: self.forget, Opcode.BATCH_FORGET: self.batch_forget, Opcode.GETATTR: self.getattr,
            Opcode.SETATTR: self.setattr, Opcode.READLINK: self.readlink, Opcode.SYMLINK: self.symlink,
            Opcode.MKDIR: self.mkdir, Opcode.UNLINK: self.unlink, Opcode.RMDIR: self.rmdir,
            Opcode.RENAME: self.rename, Opcode.RENAME2: self.rename2, Opcode.LINK: self.link,
            Opcode.OPEN: self.open, Opcode.READ: self.read, Opcode.WRITE: self.write,
            Opcode.STATFS: self.statfs, Opcode.RELEASE: self.release, Opcode.FSYNC: self.fsync,
            Opcode.FLUSH: self.flush, Opcode.OPENDIR: self.opendir, Opcode.READDIR: self.readdir,
            Opcode.READDIRPLUS: self.readdirplus, Opcode.RELEASEDIR: self.releasedir,
            Opcode.FSYNCDIR: self.fsyncdir, Opcode.CREATE: self.create, Opcode.SYNCFS: self.syncfs,
        }

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, request: bytes, reply_room: int) -> bytes | None:
        """The reply to one request (``None``: the opcode has none, FORGET and BATCH_FORGET).
        ``reply_room`` is how many bytes the chain's writable part holds: READ and READDIR
        answer no more than fits."""
        try:
            header, body = fuse.parse_request(request)
        except FuseError as exc:
            if len(request) >= fuse.IN_HEADER.size:  # answer what can be answered
                unique = fuse.IN_HEADER.unpack_from(request)[2]
                return fuse.reply(unique, error=exc.errno)
            return None
        with self._lock:
            self.requests[_opcode_name(header.opcode)] += 1
        handler = self.handlers.get(header.opcode)
        if handler is None:
            return fuse.reply(header.unique, error=errno.ENOSYS)
        if not self.initialized and header.opcode != Opcode.INIT:
            return fuse.reply(header.unique, error=errno.EIO)
        error = 0
        try:
            body_out = handler(header, body, max(reply_room - fuse.OUT_HEADER.size, 0))
        except FuseError as exc:
            error = exc.errno
        except OSError as exc:
            error = exc.errno or errno.EIO
        except (ValueError, OverflowError, struct.error):  # a value the host cannot take or report
            error = errno.EINVAL
        if header.opcode in (Opcode.FORGET, Opcode.BATCH_FORGET):
            return None  # no reply, even to a malformed one
        return fuse.reply(header.unique, error=error) if error else fuse.reply(header.unique, body_out or b"")

    def close(self) -> None:
        """Close every descriptor (the frontend went away); the root stays open."""
        with self._lock:
            self._drop_all()

    def _drop_all(self) -> None:
        for node, inode in list(self._inodes.items()):
            if node != fuse.ROOT_ID:
                os.close(inode.fd)
        self._inodes = {fuse.ROOT_ID: self._root}
        self._by_key = {self._root.key: fuse.ROOT_ID}
        for fd in self._files.values():
            os.close(fd)
        for handle in self._dirs.values():
            os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()
        self.initialized = False

    # -- tables --------------------------------------------------------------------------------

    def _inode(self, node: int) -> Inode:
        with self._lock:
            inode = self._inodes.get(node)
        if inode is None:
            raise FuseError(errno.EBADF, f"unknown node id {node}")
        return inode

    def _file(self, fh: int) -> int:
        with self._lock:
            fd = self._files.get(fh)
        if fd is None:
            raise FuseError(errno.EBADF, f"unknown file handle {fh}")
        return fd

    def _dir(self, fh: int) -> DirHandle:
        with self._lock:
            handle = self._dirs.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF, f"unknown directory handle {fh}")
        return handle

    def _new_handle(self) -> int:
        handle = self._next_handle
        self._next_handle += 1
        return handle

    def _attr(self, st: os.stat_result) -> bytes:
        return fuse.ATTR.pack(
            st.st_ino, st.st_size, st.st_blocks, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
            st.st_atime_ns % 1_000_000_000, st.st_mtime_ns % 1_000_000_000, st.st_ctime_ns % 1_000_000_000,
            st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_rdev, st.st_blksize, 0)

    def _entry(self, node: int, st: os.stat_result) -> bytes:
        return fuse.ENTRY_OUT.pack(node, 0, TIMEOUT_SECONDS, TIMEOUT_SECONDS, 0, 0) + self._attr(st)

    def _do_lookup(self, parent: Inode, name: str) -> tuple[int, os.stat_result]:
        """Open ``name`` under ``parent`` (O_PATH, no symlink followed) and count a lookup."""
        if parent.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        with self._lock:
            node = self._by_key.get(key)
            if node is not None:
                self._inodes[node].lookups += 1
                os.close(fd)
            else:
                node = self._next_node
                self._next_node += 1
                self._inodes[node] = Inode(fd, key, stat.S_IFMT(st.st_mode), 1)
                self._by_key[key] = node
        return node, st

    def _forget(self, node: int, count: int) -> None:
        if node == fuse.ROOT_ID:
            return
        with self._lock:
            inode = self._inodes.get(node)
            if inode is None:
                return
            inode.lookups -= min(count, inode.lookups)
            if inode.lookups == 0:
                del self._inodes[node]
                self._by_key.pop(inode.key, None)
                os.close(inode.fd)

    def _reopen(self, inode: Inode, flags: int) -> int:
        """A new descriptor for the very inode (``/proc/self/fd/N`` of its O_PATH fd)."""
        if inode.kind == stat.S_IFLNK:
            raise FuseError(errno.ELOOP)
        return os.open(f"/proc/self/fd/{inode.fd}", (flags & _OPEN_FLAGS) | os.O_CLOEXEC)

    # -- the session ---------------------------------------------------------------------------

    def init(self, header: InHeader, body: Reader, room: int) -> bytes:
        major, minor, max_readahead, flags = body.unpack(fuse.INIT_IN)
        if major != fuse.KERNEL_VERSION:
            # A newer major: reply with ours and the kernel retries (fuse.h); an older one fails.
            if major > fuse.KERNEL_VERSION:
                return fuse.INIT_OUT.pack(fuse.KERNEL_VERSION, fuse.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
            raise FuseError(errno.EPROTO, f"FUSE {major}.{minor} is too old")
        wanted = (fuse.FUSE_ASYNC_READ | fuse.FUSE_BIG_WRITES | fuse.FUSE_DO_READDIRPLUS
                  | fuse.FUSE_READDIRPLUS_AUTO | fuse.FUSE_PARALLEL_DIROPS | fuse.FUSE_MAX_PAGES)
        with self._lock:
            self._drop_all()
            self.initialized = True
        self.max_readahead = max_readahead
        out = fuse.INIT_OUT.pack(fuse.KERNEL_VERSION, fuse.KERNEL_MINOR_VERSION, max_readahead, flags & wanted,
                                 16, 12, MAX_WRITE, 1, MAX_PAGES, 0, 0)
        if minor < 5:
            return out[:8]
        if minor < 23:
            return out[:24]
        return out

    def destroy(self, header: InHeader, body: Reader, room: int) -> bytes:
        with self._lock:
            self._drop_all()
        return b""

    # -- names ---------------------------------------------------------------------------------

    def lookup(self, header: InHeader, body: Reader, room: int) -> bytes:
        name = check_name(body.name())
        node, st = self._do_lookup(self._inode(header.nodeid), name)
        return self._entry(node, st)

    def forget(self, header: InHeader, body: Reader, room: int) -> None:
        (count,) = body.unpack(fuse.FORGET_IN)
        self._forget(header.nodeid, count)

    def batch_forget(self, header: InHeader, body: Reader, room: int) -> None:
        count, _ = body.unpack(fuse.BATCH_FORGET_IN)
        if count * fuse.FORGET_ONE.size > body.remaining:
            raise FuseError(errno.EINVAL, f"BATCH_FORGET of {count} entries in {body.remaining} bytes")
        for _ in range(count):
            node, lookups = body.unpack(fuse.FORGET_ONE)
            self._forget(node, lookups)

    def getattr(self, header: InHeader, body: Reader, room: int) -> bytes:
        st = os.fstat(self._inode(header.nodeid).fd)
        return fuse.ATTR_OUT.pack(TIMEOUT_SECONDS, 0, 0) + self._attr(st)

    def setattr(self, header: InHeader, body: Reader, room: int) -> bytes:
        (valid, _pad, fh, size, _lock_owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec, mode,
         _unused4, uid, gid, _unused5) = body.unpack(fuse.SETATTR_IN)
        inode = self._inode(header.nodeid)
        if inode.kind == stat.S_IFLNK and valid & (FATTR_ALL & ~(fuse.FATTR_FH | fuse.FATTR_LOCKOWNER)):
            raise FuseError(errno.EOPNOTSUPP, "SETATTR of a symlink")
        path = f"/proc/self/fd/{inode.fd}"
        target: int | str = self._file(fh) if valid & fuse.FATTR_FH and inode.kind == stat.S_IFREG else path
        if valid & fuse.FATTR_MODE:
            os.chmod(target, stat.S_IMODE(mode))
        if valid & (fuse.FATTR_UID | fuse.FATTR_GID):
            os.chown(target, uid if valid & fuse.FATTR_UID else -1, gid if valid & fuse.FATTR_GID else -1)
        if valid & fuse.FATTR_SIZE:
            if isinstance(target, int):
                os.ftruncate(target, size)
            else:
                fd = self._reopen(inode, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if valid & (fuse.FATTR_ATIME | fuse.FATTR_MTIME):
            now = os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns
            atime_ns = _time(valid, fuse.FATTR_ATIME, fuse.FATTR_ATIME_NOW, atime, atimensec, now[0])
            mtime_ns = _time(valid, fuse.FATTR_MTIME, fuse.FATTR_MTIME_NOW, mtime, mtimensec, now[1])
            os.utime(target, ns=(atime_ns, mtime_ns))
        st = os.fstat(inode.fd)
        return fuse.ATTR_OUT.pack(TIMEOUT_SECONDS, 0, 0) + self._attr(st)

    def readlink(self, header: InHeader, body: Reader, room: int) -> bytes:
        inode = self._inode(header.nodeid)
        if inode.kind != stat.S_IFLNK:
            raise FuseError(errno.EINVAL)
        return os.fsencode(os.readlink("", dir_fd=inode.fd))

    def symlink(self, header: InHeader, body: Reader, room: int) -> bytes:
        name = check_name(body.name())
        target = body.name(fuse.PATH_MAX)
        if not target:
            raise FuseError(errno.ENOENT)
        parent = self._inode(header.nodeid)
        with hostcalls.as_caller(header.uid, header.gid):
            os.symlink(os.fsdecode(target), name, dir_fd=parent.fd)  # data for the guest to resolve
        node, st = self._do_lookup(parent, name)
        return self._entry(node, st)

    def mkdir(self, header: InHeader, body: Reader, room: int) -> bytes:
        mode, umask = body.unpack(fuse.MKDIR_IN)
        name = check_name(body.name())
        parent = self._inode(header.nodeid)
        with hostcalls.as_caller(header.uid, header.gid):
            os.mkdir(name, stat.S_IMODE(mode) & ~umask & 0o7777, dir_fd=parent.fd)
        node, st = self._do_lookup(parent, name)
        return self._entry(node, st)

    def unlink(self, header: InHeader, body: Reader, room: int) -> bytes:
        name = check_name(body.name())
        os.unlink(name, dir_fd=self._inode(header.nodeid).fd)
        return b""

    def rmdir(self, header: InHeader, body: Reader, room: int) -> bytes:
        name = check_name(body.name())
        os.rmdir(name, dir_fd=self._inode(header.nodeid).fd)
        return b""

    def rename(self, header: InHeader, body: Reader, room: int) -> bytes:
        (newdir,) = body.unpack(fuse.RENAME_IN)
        return self._rename(header.nodeid, newdir, 0, body)

    def rename2(self, header: InHeader, body: Reader, room: int) -> bytes:
        newdir, flags, _pad = body.unpack(fuse.RENAME2_IN)
        return self._rename(header.nodeid, newdir, flags, body)

    def _rename(self, olddir: int, newdir: int, flags: int, body: Reader) -> bytes:
        old = check_name(body.name())
        new = check_name(body.name())
        source, destination = self._inode(olddir), self._inode(newdir)
        if flags & ~(fuse.RENAME_NOREPLACE | fuse.RENAME_EXCHANGE):
            raise FuseError(errno.EINVAL, f"RENAME2 flags {flags:#x}")
        if flags:
            hostcalls.renameat2(source.fd, old, destination.fd, new, flags)
        else:
            os.rename(old, new, src_dir_fd=source.fd, dst_dir_fd=destination.fd)
        return b""

    def link(self, header: InHeader, body: Reader, room: int) -> bytes:
        (oldnode,) = body.unpack(fuse.LINK_IN)
        name = check_name(body.name())
        inode, parent = self._inode(oldnode), self._inode(header.nodeid)
        if inode.kind == stat.S_IFDIR:
            raise FuseError(errno.EPERM)
        # linkat(fd, "", ..., AT_EMPTY_PATH) needs CAP_DAC_READ_SEARCH; the magic link does not.
        os.link(f"/proc/self/fd/{inode.fd}", name, dst_dir_fd=parent.fd, follow_symlinks=True)
        node, st = self._do_lookup(parent, name)
        return self._entry(node, st)

    # -- files ---------------------------------------------------------------------------------

    def open(self, header: InHeader, body: Reader, room: int) -> bytes:
        flags, _open_flags = body.unpack(fuse.OPEN_IN)
        inode = self._inode(header.nodeid)
        if inode.kind == stat.S_IFDIR:
            raise FuseError(errno.EISDIR)
        fd = self._reopen(inode, flags & ~os.O_DIRECTORY)
        with self._lock:
            handle = self._new_handle()
            self._files[handle] = fd
        return fuse.OPEN_OUT.pack(handle, 0, 0)

    def create(self, header: InHeader, body: Reader, room: int) -> bytes:
        flags, mode, umask, _open_flags = body.unpack(fuse.CREATE_IN)
        name = check_name(body.name())
        parent = self._inode(header.nodeid)
        if parent.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        open_flags = (flags & _OPEN_FLAGS & ~os.O_DIRECTORY) | os.O_CREAT | (flags & os.O_EXCL)
        with hostcalls.as_caller(header.uid, header.gid):
            fd = os.open(name, open_flags | os.O_NOFOLLOW | os.O_CLOEXEC, stat.S_IMODE(mode) & ~umask & 0o7777,
                         dir_fd=parent.fd)
        try:
            node, st = self._do_lookup(parent, name)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            handle = self._new_handle()
            self._files[handle] = fd
        return self._entry(node, st) + fuse.OPEN_OUT.pack(handle, 0, 0)

    def read(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, offset, size, _rf, _lo, _flags, _pad = body.unpack(fuse.READ_IN)
        fd = self._file(fh)
        if offset >= 1 << 63:
            raise FuseError(errno.EINVAL)
        return os.pread(fd, min(size, room, MAX_WRITE), offset)

    def write(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, offset, size, _wf, _lo, _flags, _pad = body.unpack(fuse.WRITE_IN)
        if size > MAX_WRITE:
            raise FuseError(errno.EINVAL, f"WRITE of {size} bytes exceeds max_write")
        if offset >= 1 << 63:
            raise FuseError(errno.EINVAL)
        data = body.bytes(size)
        fd = self._file(fh)
        written = 0
        while written < size:
            done = os.pwrite(fd, data[written:], offset + written)
            if done == 0:
                break
            written += done
        return fuse.WRITE_OUT.pack(written, 0)

    def statfs(self, header: InHeader, body: Reader, room: int) -> bytes:
        st = os.fstatvfs(self._inode(header.nodeid).fd)
        return fuse.KSTATFS.pack(st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_bsize,
                                 st.f_namemax, st.f_frsize, 0)

    def release(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, _flags, _release_flags, _lock_owner = body.unpack(fuse.RELEASE_IN)
        with self._lock:
            fd = self._files.pop(fh, None)
        if fd is None:
            raise FuseError(errno.EBADF)
        os.close(fd)
        return b""

    def flush(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, _unused, _pad, _lock_owner = body.unpack(fuse.FLUSH_IN)
        os.close(os.dup(self._file(fh)))  # what close(2) of the guest's descriptor would do
        return b""

    def fsync(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, flags, _pad = body.unpack(fuse.FSYNC_IN)
        fd = self._file(fh)
        (os.fdatasync if flags & fuse.FUSE_FSYNC_FDATASYNC else os.fsync)(fd)
        return b""

    def syncfs(self, header: InHeader, body: Reader, room: int) -> bytes:
        body.unpack(fuse.SYNCFS_IN)
        fd = self._reopen(self._inode(header.nodeid), os.O_RDONLY | os.O_DIRECTORY)
        try:
            hostcalls.syncfs(fd)
        finally:
            os.close(fd)
        return b""

    # -- directories ---------------------------------------------------------------------------

    def opendir(self, header: InHeader, body: Reader, room: int) -> bytes:
        body.unpack(fuse.OPEN_IN)
        inode = self._inode(header.nodeid)
        if inode.kind != stat.S_IFDIR:
            raise FuseError(errno.ENOTDIR)
        fd = self._reopen(inode, os.O_RDONLY | os.O_DIRECTORY)
        with self._lock:
            handle = self._new_handle()
            self._dirs[handle] = DirHandle(fd)
        return fuse.OPEN_OUT.pack(handle, 0, 0)

    def _listing(self, handle: DirHandle, offset: int) -> list[tuple[bytes, int, int]]:
        if handle.entries is None or offset == 0:  # a rewinddir() reads the directory again
            st = os.fstat(handle.fd)
            entries = [(b".", st.st_ino, stat.S_IFDIR >> 12), (b"..", 0, stat.S_IFDIR >> 12)]
            with os.scandir(handle.fd) as scan:
                for entry in scan:
                    try:
                        kind = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
                    except OSError:  # removed since
                        continue
                    entries.append((os.fsencode(entry.name), entry.inode(), kind))
            handle.entries = entries
        return handle.entries

    def readdir(self, header: InHeader, body: Reader, room: int) -> bytes:
        return self._readdir(header, body, room, plus=False)

    def readdirplus(self, header: InHeader, body: Reader, room: int) -> bytes:
        return self._readdir(header, body, room, plus=True)

    def _readdir(self, header: InHeader, body: Reader, room: int, *, plus: bool) -> bytes:
        fh, offset, size, _rf, _lo, _flags, _pad = body.unpack(fuse.READ_IN)
        handle = self._dir(fh)
        parent = self._inode(header.nodeid)
        entries = self._listing(handle, offset)
        limit = min(size, room)
        out = bytearray()
        for index in range(offset, len(entries)):
            name, ino, kind = entries[index]
            record = fuse.dirent(ino, index + 1, kind, name)
            if plus:
                if name in (b".", b".."):  # the kernel skips these: no lookup is counted
                    prefix = fuse.ENTRY_OUT.pack(0, 0, 0, 0, 0, 0) + bytes(fuse.ATTR.size)
                    if len(out) + len(prefix) + len(record) > limit:
                        break
                    out += prefix + record
                    continue
                if len(out) + fuse.ENTRY_OUT.size + fuse.ATTR.size + len(record) > limit:
                    break
                try:
                    node, st = self._do_lookup(parent, os.fsdecode(name))
                except OSError:  # gone since the listing
                    continue
                out += self._entry(node, st) + fuse.dirent(st.st_ino, index + 1, stat.S_IFMT(st.st_mode) >> 12,
                                                            name)
            else:
                if len(out) + len(record) > limit:
                    break
                out += record
        return bytes(out)

    def releasedir(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, _flags, _release_flags, _lock_owner = body.unpack(fuse.RELEASE_IN)
        with self._lock:
            handle = self._dirs.pop(fh, None)
        if handle is None:
            raise FuseError(errno.EBADF)
        os.close(handle.fd)
        return b""

    def fsyncdir(self, header: InHeader, body: Reader, room: int) -> bytes:
        fh, flags, _pad = body.unpack(fuse.FSYNC_IN)
        fd = self._dir(fh).fd
        (os.fdatasync if flags & fuse.FUSE_FSYNC_FDATASYNC else os.fsync)(fd)
        return b""


FATTR_ALL: Final = (fuse.FATTR_MODE | fuse.FATTR_UID | fuse.FATTR_GID | fuse.FATTR_SIZE | fuse.FATTR_ATIME
                    | fuse.FATTR_MTIME | fuse.FATTR_FH | fuse.FATTR_ATIME_NOW | fuse.FATTR_MTIME_NOW
                    | fuse.FATTR_LOCKOWNER | fuse.FATTR_CTIME | fuse.FATTR_KILL_SUIDGID)


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"UNKNOWN({opcode})"


def _time(valid: int, given: int, now_flag: int, seconds: int, nanoseconds: int, current: int) -> int:
    if valid & now_flag:
        import time

        return time.time_ns()
    if valid & given:
        if nanoseconds >= 1_000_000_000 or seconds >= 1 << 62:
            raise FuseError(errno.EINVAL)
        return seconds * 1_000_000_000 + nanoseconds
    return current
