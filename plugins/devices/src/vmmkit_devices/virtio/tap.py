"""TAP network interfaces for virtio-net: open one by name through ``/dev/net/tun`` (created if
absent) or adopt an fd that is one already, then configure the host side with plain ioctls.

A :class:`Tap` is a non-blocking fd in ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` mode with a 12-byte
``virtio_net_hdr`` (``TUNSETVNETHDRSZ``, the header of virtio 1.x, ``num_buffers`` included).
Opening it probes which receive offloads the kernel's tap takes (:attr:`Tap.offloads`, ``TUN_F_*``
bits: checksum, TSO4/6, ECN, UFO) and leaves none set (``TUNSETOFFLOAD`` 0: the kernel hands over
complete, checksummed frames) until :meth:`Tap.set_offload` is called with what the guest's driver
negotiated. The interface lives in the network namespace of the thread that opened it.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from typing import Final

from vmmkit.errors import DeviceError
from vmmkit.log import get_logger

log = get_logger()

TUN_PATH: Final = "/dev/net/tun"
IFNAMSIZ: Final = 16

TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
TUNGETIFF: Final = 0x800454D2
TUNSETVNETHDRSZ: Final = 0x400454D8

TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
TUN_F_UFO: Final = 0x10

IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000

SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
SIOCSIFADDR: Final = 0x8916
SIOCSIFNETMASK: Final = 0x891C
SIOCSIFMTU: Final = 0x8922
SIOCSIFHWADDR: Final = 0x8924

IFF_UP: Final = 0x1
ARPHRD_ETHER: Final = 1

#: virtio 1.x: struct virtio_net_hdr_mrg_rxbuf, whether or not MRG_RXBUF is negotiated.
VNET_HDR_SIZE: Final = 12


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return name.encode().ljust(IFNAMSIZ, b"\0") + payload.ljust(24, b"\0")


def _check_name(name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw:
        raise DeviceError(f"tap name {name!r} is not a valid interface name (1 to 15 bytes)")


class Tap:
    """An open TAP queue (a non-blocking fd this object owns) and its interface's name."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        #: The ``TUN_F_*`` receive offloads this tap accepts (probed when opened or adopted).
        self.offloads = 0

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, name: str | None = None) -> Tap:
        """Attach to tap ``name`` (creating a non-persistent one if absent) or, with ``None``, a
        new one the kernel names ``vmtap<N>``, as Cloud Hypervisor does."""
        if name is not None:
            _check_name(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise DeviceError(f"cannot open {TUN_PATH}: {exc.strerror or exc}") from None
        try:
            request = struct.pack("16sH22x", (name or "vmtap%d").encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                answer = fcntl.ioctl(fd, TUNSETIFF, request)
            except OSError as exc:
                what = f"tap {name}" if name else "a new tap"
                if exc.errno == errno.EBUSY:
                    raise DeviceError(f"{what} is in use by another process") from None
                if exc.errno == errno.EPERM:
                    raise DeviceError(f"cannot open {what}: not permitted (CAP_NET_ADMIN is needed to "
                                      "create a tap, or own a persistent one)") from None
                if exc.errno == errno.EINVAL:
                    raise DeviceError(f"cannot open {what}: an interface of another kind has that name, "
                                      "or its flags differ (multi-queue?)") from None
                raise DeviceError(f"cannot open {what}: {exc.strerror or exc}") from None
            tap = cls(fd, answer[:IFNAMSIZ].rstrip(b"\0").decode())
            tap._configure_queue()
            return tap
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int) -> Tap:
        """An fd the caller opened (``--net fd=[N]``): it must be a tap in IFF_VNET_HDR mode.
        The device works on a duplicate; the caller's fd stays open."""
        try:
            own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        except OSError as exc:
            raise DeviceError(f"tap fd {fd}: {exc.strerror or exc}") from None
        try:
            try:
                answer = fcntl.ioctl(own, TUNGETIFF, bytes(40))
            except OSError:
                raise DeviceError(f"fd {fd} is not a tap device") from None
            name = answer[:IFNAMSIZ].rstrip(b"\0").decode()
            (flags,) = struct.unpack_from("H", answer, IFNAMSIZ)
            if not flags & IFF_TAP:
                raise DeviceError(f"fd {fd} ({name}) is a tun (layer 3) device, not a tap")
            if not flags & IFF_VNET_HDR:
                raise DeviceError(f"fd {fd} ({name}) was opened without IFF_VNET_HDR")
            if not flags & IFF_NO_PI:
                raise DeviceError(f"fd {fd} ({name}) was opened without IFF_NO_PI")
            os.set_blocking(own, False)
            tap = cls(own, name)
            tap._configure_queue()
            return tap
        except BaseException:
            os.close(own)
            raise

    def _configure_queue(self) -> None:
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
        except OSError as exc:
            raise DeviceError(f"tap {self.name}: cannot set the virtio-net header: {exc.strerror or exc}") from None
        self.offloads = self._probe_offloads()

    def _probe_offloads(self) -> int:
        """The largest of the usual offload sets the kernel takes (as QEMU's ``tap_probe_has_ufo``:
        UFO went away in Linux 4.14 and came back for taps), then none set again."""
        every = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        for flags in (every | TUN_F_UFO, every, TUN_F_CSUM):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            except OSError:
                continue
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)
            return flags
        return 0

    def set_offload(self, flags: int) -> None:
        """``TUNSETOFFLOAD``: the ``TUN_F_*`` offloads frames read from the tap may use (the
        guest's driver negotiated them: partial checksums, TSO/UFO super-frames).

        :raises DeviceError: the kernel refused them.
        """
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise DeviceError(f"tap {self.name}: TUNSETOFFLOAD {flags:#x}: {exc.strerror or exc}") from None

    # -- the host side ---------------------------------------------------------------------

    def _ioctl(self, request: int, payload: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            return fcntl.ioctl(sock.fileno(), request, _ifreq(self.name, payload))

    def set_up(self) -> None:
        """Bring the interface up (IFF_UP)."""
        answer = self._ioctl(SIOCGIFFLAGS, b"")
        (flags,) = struct.unpack_from("H", answer, IFNAMSIZ)
        if not flags & IFF_UP:
            self._ioctl(SIOCSIFFLAGS, struct.pack("H", flags | IFF_UP))

    def set_address(self, ip: str, mask: str) -> None:
        """Give the host side ``ip``/``mask``, by ioctl (IPv6: ``SIOCSIFADDR`` with an
        ``in6_ifreq`` on an AF_INET6 socket, as net-tools' ``ifconfig`` does; no ``ip`` command,
        which a VMM thread under seccomp may not start). An address already there is kept."""
        address = ipaddress.ip_address(ip)
        if address.version == 4:
            netmask = ipaddress.ip_address(mask)
            self._ioctl(SIOCSIFADDR, struct.pack("H2x4s", socket.AF_INET, address.packed))
            self._ioctl(SIOCSIFNETMASK, struct.pack("H2x4s", socket.AF_INET, netmask.packed))
            return
        prefix = ipaddress.ip_network(f"::/{mask}").prefixlen
        request = struct.pack("16sIi", address.packed, prefix, socket.if_nametoindex(self.name))
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as inet6:
            try:
                fcntl.ioctl(inet6, SIOCSIFADDR, request)
            except FileExistsError:
                pass

    def set_mtu(self, mtu: int) -> None:
        self._ioctl(SIOCSIFMTU, struct.pack("i", mtu))

    def set_mac(self, mac: bytes) -> None:
        """The host side's MAC address (``host_mac``)."""
        self._ioctl(SIOCSIFHWADDR, struct.pack("H6s", ARPHRD_ETHER, mac))

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
