"""qcow2 images for virtio-blk: read, write, cluster allocation, backing files.

The format is QEMU's ``docs/interop/qcow2.txt`` (versions 2 and 3). Supported: 16-bit refcounts
(``refcount_order`` 4, QEMU's default), L1/L2 tables, zero clusters (v3 bit 0), compressed
clusters *read* (``compression_type`` zlib: raw deflate, as QEMU writes it), backing files (raw or
qcow2, read through; a write copies the backing cluster first; a relative backing path is relative
to the image's directory). Refused by name: encryption, external data files, extended L2 entries,
zstd compression, other refcount widths, an image marked corrupt, any unknown incompatible
feature bit. An image with internal snapshots, or marked dirty (lazy refcounts not yet repaired),
is opened read-only only: writing would need snapshot-aware copy-on-write of shared clusters, or
refcounts we cannot trust. A write that needs the refcount table itself to grow fails with
``ENOSPC`` (``qemu-img create`` sizes it for at least 4 GiB of 4 KiB clusters, far more for larger ones).

Every header field and table entry is hostile input: offsets are checked to be aligned and inside
the file before any access, and a bad one raises :class:`Qcow2Error` (a :class:`DeviceError`)
naming the file and the field. New clusters are appended at the end of the file; for each the
metadata is written in dependency order (refcount, then data, then the L2 entry, then the L1
entry; refcounts first as in QEMU, so a VMM crash between them leaks a cluster rather than
leaving a referenced cluster free). Durability is at ``flush`` (``fsync``), as with a raw image;
there is no barrier between those writes, so a *host* crash between two guest FLUSHes may leave
metadata that needs ``qemu-img check -r all``.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from typing import Final

from vmmkit.errors import DeviceError

MAGIC: Final = b"QFI\xfb"
_HEADER_V2: Final = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3_EXTRA: Final = struct.Struct(">QQQII")  # 32 bytes: up to header_length
_OFFSET_MASK: Final = 0x00FF_FFFF_FFFF_FE00  # bits 9-55 of L1/L2 entries
_COPIED: Final = 1 << 63
_COMPRESSED: Final = 1 << 62
_ZERO: Final = 1
_INCOMPAT_DIRTY: Final = 1 << 0
_INCOMPAT_CORRUPT: Final = 1 << 1
_INCOMPAT_DATA_FILE: Final = 1 << 2
_INCOMPAT_COMPRESSION: Final = 1 << 3
_INCOMPAT_EXTL2: Final = 1 << 4
_EXT_END: Final = 0
_EXT_BACKING_FORMAT: Final = 0xE2792ACA
_EXT_ENCRYPTION: Final = 0x0537BE77
_EXT_DATA_FILE: Final = 0x44415441
_MAX_L1_BYTES: Final = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
_MAX_REFTABLE_BYTES: Final = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE
_MAX_BACKING_DEPTH: Final = 16
_MAX_VIRTUAL_SIZE: Final = 1 << 55


class Qcow2Error(DeviceError):
    """A qcow2 image is malformed or uses a feature vmmkit does not implement."""


def is_qcow2(fd: int) -> bool:
    """The first four bytes are qcow2's magic (how Cloud Hypervisor detects the format)."""
    try:
        return os.pread(fd, 4, 0) == MAGIC
    except OSError:
        return False


class _Raw:
    """A raw backing file: reads past its end are zeros."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, max(0, min(length, self.size - offset)), offset) if offset < self.size else b""
        return data + bytes(length - len(data))

    def close(self) -> None:
        os.close(self.fd)


class Qcow2Image:
    """An open qcow2 image on ``fd`` (the caller keeps owning ``fd``; backing files are ours).

    :param allow_backing: a backing file may be opened (Cloud Hypervisor's ``backing_files=on``).
    :raises Qcow2Error: a malformed header or tables, or a refused feature; the message names
        ``path`` and the field.
    """

    def __init__(self, fd: int, path: str, *, readonly: bool, allow_backing: bool = True,
                 _depth: int = 0, _seen: frozenset[str] = frozenset()) -> None:
        self.fd = fd
        self.path = path
        self.readonly = readonly
        self.backing: Qcow2Image | _Raw | None = None
        self._backing_fd = -1
        self._decompressed: tuple[int, bytes] | None = None
        self._autoclear = 0
        self._file_size = os.fstat(fd).st_size
        self._parse_header()
        self._load_l1()
        if self._backing_path is not None:
            try:
                self._open_backing(allow_backing, _depth, _seen)
            except BaseException:
                self.close()
                raise
        self._next_free = self._align_up(self._file_size)
        if self._autoclear and not readonly:
            # qcow2.txt: a writer that does not know an auto-clear feature (bitmaps...) clears its
            # bit first, so the data it describes is known stale. We know none.
            os.pwrite(fd, bytes(8), 88)
            self._autoclear = 0

    # -- opening ------------------------------------------------------------------------------

    def _fail(self, field: str, why: str) -> Qcow2Error:
        return Qcow2Error(f"qcow2 image {self.path}: {field}: {why}")

    def _parse_header(self) -> None:
        raw = os.pread(self.fd, 4096, 0)
        if len(raw) < _HEADER_V2.size:
            raise self._fail("header", f"the file is {len(raw)} bytes, shorter than a qcow2 header")
        (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size,
         l1_offset, reftable_offset, reftable_clusters, nb_snapshots, snapshots_offset) = _HEADER_V2.unpack_from(raw)
        if magic != MAGIC:
            raise self._fail("magic", "not a qcow2 image")
        if version not in (2, 3):
            raise self._fail("version", f"{version} is not supported (2 or 3)")
        if not 9 <= cluster_bits <= 21:
            raise self._fail("cluster_bits", f"{cluster_bits} is outside 9..21")
        self.cluster_bits: int = cluster_bits
        self.cluster_size: int = 1 << cluster_bits
        self.version = version
        incompatible = autoclear = 0
        refcount_order = 4
        header_length = 72
        compression_type = 0
        if version == 3:
            if len(raw) < _HEADER_V2.size + _HEADER_V3_EXTRA.size:
                raise self._fail("header", "a version 3 header is 104 bytes or more")
            incompatible, _compat, autoclear, refcount_order, header_length = \
                _HEADER_V3_EXTRA.unpack_from(raw, _HEADER_V2.size)
            if header_length < 104 or header_length % 8 or header_length > min(len(raw), self.cluster_size):
                raise self._fail("header_length", f"{header_length} is not a multiple of 8 in 104..cluster size")
            if header_length > 104:
                compression_type = raw[104]
        if incompatible & _INCOMPAT_CORRUPT:
            raise self._fail("incompatible_features",
                             "the image is marked corrupt (repair it with qemu-img check -r all)")
        if incompatible & _INCOMPAT_DATA_FILE:
            raise self._fail("incompatible_features", "external data files are not supported")
        if incompatible & _INCOMPAT_EXTL2:
            raise self._fail("incompatible_features", "extended L2 entries (subclusters) are not supported")
        if incompatible & _INCOMPAT_COMPRESSION and compression_type != 0:
            raise self._fail("compression_type", f"{compression_type} is not supported (zlib only)")
        unknown = incompatible & ~(_INCOMPAT_DIRTY | _INCOMPAT_COMPRESSION)
        if unknown:
            raise self._fail("incompatible_features", f"unknown feature bits {unknown:#x}")
        if crypt_method:
            raise self._fail("crypt_method", "encrypted images are not supported")
        if refcount_order != 4:
            raise self._fail("refcount_order", f"{refcount_order} is not supported (16-bit refcounts, order 4, only)")
        if self.readonly:
            pass
        elif nb_snapshots:
            raise self._fail("nb_snapshots", f"the image has {nb_snapshots} internal snapshots; "
                             "it can be used read-only only (readonly=on)")
        elif incompatible & _INCOMPAT_DIRTY:
            raise self._fail("incompatible_features", "the image is dirty (its refcounts need repair: "
                             "qemu-img check -r all); it can be used read-only only")
        if size % 512 or size > _MAX_VIRTUAL_SIZE:
            raise self._fail("size", f"{size} is not a multiple of 512 below 2^55")
        self.size: int = size
        self.l2_entries = self.cluster_size // 8
        needed_l1 = -(-size // (self.cluster_size * self.l2_entries))
        if l1_size < needed_l1 or l1_size * 8 > _MAX_L1_BYTES:
            raise self._fail("l1_size", f"{l1_size} entries cannot map {size} bytes (needs {needed_l1})")
        self.l1_size = l1_size
        self.l1_offset = self._table("l1_table_offset", l1_offset, l1_size * 8)
        reftable_bytes = reftable_clusters * self.cluster_size
        if not reftable_clusters or reftable_bytes > _MAX_REFTABLE_BYTES:
            raise self._fail("refcount_table_clusters", f"{reftable_clusters} is out of range")
        self.reftable_offset = self._table("refcount_table_offset", reftable_offset, reftable_bytes)
        self.reftable_entries = reftable_bytes // 8
        self.refblock_entries = self.cluster_size // 2
        if nb_snapshots:
            self._table("snapshots_offset", snapshots_offset, 0)
        self._backing_path: str | None = None
        self._backing_format: str | None = None
        if backing_offset:
            if not 0 < backing_size <= 1023 or backing_offset + backing_size > self.cluster_size:
                raise self._fail("backing_file_offset", "the backing file name lies outside the first cluster")
            name = raw[backing_offset:backing_offset + backing_size] if backing_offset + backing_size <= len(raw) \
                else os.pread(self.fd, backing_size, backing_offset)
            if len(name) != backing_size or b"\0" in name:
                raise self._fail("backing_file_size", "the backing file name is truncated or contains NUL")
            try:
                self._backing_path = name.decode()
            except UnicodeDecodeError:
                raise self._fail("backing_file_offset", "the backing file name is not UTF-8") from None
        self._autoclear = autoclear if version == 3 else 0
        # Extensions follow the header (v2 too), up to the backing file name or the first cluster,
        # as QEMU's qcow2_read_extensions; none at all (an old v2 image) is fine.
        self._parse_extensions(raw, header_length, backing_offset or self.cluster_size)

    def _parse_extensions(self, raw: bytes, at: int, end: int) -> None:
        end = min(end, self.cluster_size)
        if len(raw) < end:
            raw = os.pread(self.fd, end, 0)
        end = min(end, len(raw))
        while at < end:
            if end - at < 8:
                raise self._fail("header extensions", "an extension header runs past the extension area")
            kind, length = struct.unpack_from(">II", raw, at)
            at += 8
            if kind == _EXT_END:
                return
            if at + length > end:
                raise self._fail("header extensions",
                                 f"extension {kind:#x} of {length} bytes runs past the extension area")
            data = raw[at:at + length]
            if kind == _EXT_BACKING_FORMAT:
                self._backing_format = data.decode(errors="replace")
            elif kind == _EXT_ENCRYPTION:
                raise self._fail("header extensions", "encryption is not supported")
            elif kind == _EXT_DATA_FILE:
                raise self._fail("header extensions", "external data files are not supported")
            at += (length + 7) & ~7

    def _table(self, field: str, offset: int, length: int) -> int:
        if offset % self.cluster_size or offset <= 0 or offset + length > self._file_size:
            raise self._fail(field, f"{offset:#x} (+{length} bytes) is not a cluster-aligned range inside the file "
                             f"({self._file_size} bytes)")
        return offset

    def _load_l1(self) -> None:
        raw = os.pread(self.fd, self.l1_size * 8, self.l1_offset)
        if len(raw) != self.l1_size * 8:
            raise self._fail("l1_table_offset", "the L1 table is truncated")
        self.l1 = list(struct.unpack(f">{self.l1_size}Q", raw))

    def _open_backing(self, allow: bool, depth: int, seen: frozenset[str]) -> None:
        name = self._backing_path
        assert name is not None
        if not allow:
            raise self._fail("backing_file", f"the image has a backing file ({name}); "
                             "backing_files=on allows it")
        if depth >= _MAX_BACKING_DEPTH:
            raise self._fail("backing_file", f"backing chain deeper than {_MAX_BACKING_DEPTH}")
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        real = os.path.realpath(path)
        if real in seen or real == os.path.realpath(self.path):
            raise self._fail("backing_file", f"{name} makes a backing-file loop")
        fmt = self._backing_format
        if fmt not in (None, "raw", "qcow2"):
            raise self._fail("backing format", f"{fmt!r} is not supported (raw or qcow2)")
        try:  # O_NONBLOCK: a FIFO named by a hostile image must not hang the open
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (OSError, ValueError) as exc:
            raise self._fail("backing_file", f"cannot open {path}: {getattr(exc, 'strerror', None) or exc}") from None
        self._backing_fd = fd
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise self._fail("backing_file", f"{path} is not a regular file")
        os.set_blocking(fd, True)
        if fmt == "qcow2" or (fmt is None and is_qcow2(fd)):
            self.backing = Qcow2Image(fd, path, readonly=True, allow_backing=True, _depth=depth + 1,
                                      _seen=seen | {os.path.realpath(self.path)})
        else:
            self.backing = _Raw(fd)

    def close(self) -> None:
        if isinstance(self.backing, Qcow2Image):
            self.backing.close()
        if self._backing_fd >= 0:
            os.close(self._backing_fd)
            self._backing_fd = -1
        self.backing = None

    # -- helpers --------------------------------------------------------------------------------

    def _align_up(self, value: int) -> int:
        return -(-value // self.cluster_size) * self.cluster_size

    def _cluster_at(self, field: str, offset: int) -> int:
        """A host cluster's offset from metadata, checked: aligned, inside the file, and not the
        header, the L1 table or the refcount table (QEMU's overlap check, for those three)."""
        if offset % self.cluster_size or offset < self.cluster_size or offset + self.cluster_size > self._file_size:
            raise self._fail(field, f"{offset:#x} is not a cluster inside the file ({self._file_size} bytes)")
        for table, start, length in (("L1 table", self.l1_offset, self.l1_size * 8),
                                     ("refcount table", self.reftable_offset, self.reftable_entries * 8)):
            if offset < start + length and start < offset + self.cluster_size:
                raise self._fail(field, f"{offset:#x} overlaps the {table}")
        return offset

    def _pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise self._fail("read", f"short read at {offset:#x}")
        return data

    def _pwrite(self, data: bytes, offset: int) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(errno.EIO, "short write")
        self._file_size = max(self._file_size, offset + len(data))

    def _l2_entry(self, cluster: int) -> tuple[int, int]:
        """``(l2_table_offset or 0, entry)`` for guest cluster ``cluster``."""
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        l2_table = self.l1[l1_index] & _OFFSET_MASK
        if not l2_table:
            return 0, 0
        self._cluster_at(f"L1 entry {l1_index}", l2_table)
        (entry,) = struct.unpack(">Q", self._pread(8, l2_table + 8 * l2_index))
        return l2_table, entry

    def _decompress(self, entry: int, cluster: int) -> bytes:
        shift = 62 - (self.cluster_bits - 8)
        offset = entry & ((1 << shift) - 1)
        if self._decompressed is not None and self._decompressed[0] == offset:
            return self._decompressed[1]
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        length = sectors * 512 - (offset & 511)
        if offset < self.cluster_size or offset + length > self._file_size + 512:
            raise self._fail(f"L2 entry of cluster {cluster}", f"compressed data at {offset:#x} lies outside the file")
        compressed = os.pread(self.fd, length, offset)
        try:
            inflater = zlib.decompressobj(-15)
            data = inflater.decompress(compressed, self.cluster_size)
        except zlib.error as exc:
            raise self._fail(f"L2 entry of cluster {cluster}", f"compressed data is not deflate ({exc})") from None
        if len(data) != self.cluster_size:
            raise self._fail(f"L2 entry of cluster {cluster}", "compressed data does not inflate to a whole cluster")
        self._decompressed = (offset, data)
        return data

    def _read_cluster_part(self, cluster: int, start: int, length: int) -> bytes:
        _, entry = self._l2_entry(cluster)
        if entry & _COMPRESSED:
            return self._decompress(entry, cluster)[start:start + length]
        host = entry & _OFFSET_MASK
        if entry & _ZERO:
            return bytes(length)
        if host:
            self._cluster_at(f"L2 entry of cluster {cluster}", host)
            return self._pread(length, host + start)
        guest = cluster * self.cluster_size + start
        backing = self.backing
        if backing is None or guest >= backing.size:
            return bytes(length)
        data = backing.read(guest, min(length, backing.size - guest))
        return data + bytes(length - len(data))

    # -- the public interface ---------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` guest bytes at ``offset``; past a backing file's end, zeros.

        :raises Qcow2Error: metadata on the way is malformed.
        :raises OSError: the host refused.
        """
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self._fail("read", f"{length} bytes at {offset} are outside the disk")
        parts = []
        while length:
            cluster, start = divmod(offset, self.cluster_size)
            piece = min(length, self.cluster_size - start)
            parts.append(self._read_cluster_part(cluster, start, piece))
            offset += piece
            length -= piece
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes, allocating (and copying into) clusters as needed.

        :raises Qcow2Error: metadata on the way is malformed, or the image is read-only.
        :raises OSError: the host refused (``ENOSPC`` when the refcount table would have to grow).
        """
        if self.readonly:
            raise self._fail("write", "the image is read-only")
        if offset < 0 or offset + len(data) > self.size:
            raise self._fail("write", f"{len(data)} bytes at {offset} are outside the disk")
        view = memoryview(data)
        while view:
            cluster, start = divmod(offset, self.cluster_size)
            piece = min(len(view), self.cluster_size - start)
            self._write_cluster_part(cluster, start, bytes(view[:piece]))
            offset += piece
            view = view[piece:]

    def flush(self) -> None:
        os.fsync(self.fd)

    # -- writing --------------------------------------------------------------------------------

    def _write_cluster_part(self, cluster: int, start: int, data: bytes) -> None:
        l1_index, l2_index = divmod(cluster, self.l2_entries)
        l2_table, entry = self._l2_entry(cluster)
        host = entry & _OFFSET_MASK
        if host and not entry & (_COMPRESSED | _ZERO):
            self._cluster_at(f"L2 entry of cluster {cluster}", host)
            self._pwrite(data, host + start)
            return
        # A new data cluster: its old contents (backing, zeros or compressed), then ours.
        if data and len(data) == self.cluster_size:
            contents = data
        else:
            old = bytearray(self._read_cluster_part(cluster, 0, self.cluster_size))
            old[start:start + len(data)] = data
            contents = bytes(old)
        if not l2_table:
            l2_table = self._allocate()
            self._pwrite(bytes(self.cluster_size), l2_table)
            new_l1 = l2_table | _COPIED
        else:
            new_l1 = None
        if host and entry & _ZERO and not entry & _COMPRESSED:  # preallocated zero cluster: reuse it
            self._cluster_at(f"L2 entry of cluster {cluster}", host)
            target = host
        else:
            target = self._allocate()
        self._pwrite(contents, target)
        self._pwrite(struct.pack(">Q", target | _COPIED), l2_table + 8 * l2_index)
        if new_l1 is not None:
            self._pwrite(struct.pack(">Q", new_l1), self.l1_offset + 8 * l1_index)
            self.l1[l1_index] = new_l1
        if entry & _COMPRESSED:
            self._release_compressed(entry)

    def _release_compressed(self, entry: int) -> None:
        shift = 62 - (self.cluster_bits - 8)
        offset = entry & ((1 << shift) - 1)
        sectors = ((entry >> shift) & ((1 << (self.cluster_bits - 8)) - 1)) + 1
        last = offset + sectors * 512 - (offset & 511) - 1
        for host_cluster in range(offset // self.cluster_size, last // self.cluster_size + 1):
            self._add_refcount(host_cluster, -1)
        if self._decompressed is not None and self._decompressed[0] == offset:
            self._decompressed = None

    def _allocate(self) -> int:
        """A new cluster at the end of the file, its refcount set to 1 (written before it is used)."""
        offset = self._next_free
        self._next_free += self.cluster_size
        self._add_refcount(offset // self.cluster_size, 1)
        if self._file_size < offset + self.cluster_size:
            self._pwrite(bytes(self.cluster_size), offset)  # reserve it (extends the file)
        return offset

    def _add_refcount(self, host_cluster: int, delta: int) -> None:
        table_index, block_index = divmod(host_cluster, self.refblock_entries)
        if table_index >= self.reftable_entries:
            raise OSError(errno.ENOSPC, f"{self.path}: the qcow2 refcount table is full (growing it is not supported)")
        entry_at = self.reftable_offset + 8 * table_index
        (block,) = struct.unpack(">Q", self._pread(8, entry_at))
        block &= ~0x1FF
        if not block:
            if delta < 0:
                raise self._fail(f"refcount table entry {table_index}", "freeing a cluster without a refcount block")
            block = self._next_free
            self._next_free += self.cluster_size
            self._pwrite(bytes(self.cluster_size), block)
            self._pwrite(struct.pack(">Q", block), entry_at)
            self._add_refcount(block // self.cluster_size, 1)  # the block counts itself (or another does)
        self._cluster_at(f"refcount table entry {table_index}", block)
        at = block + 2 * block_index
        (count,) = struct.unpack(">H", self._pread(2, at))
        count += delta
        if not 0 <= count <= 0xFFFF:
            raise self._fail(f"refcount of cluster {host_cluster}", "it would overflow or go negative")
        self._pwrite(struct.pack(">H", count), at)
