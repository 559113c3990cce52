"""The management API server: Cloud Hypervisor's REST API over a Unix socket.

``--api-socket path=<socket>`` (created mode 0600) or ``fd=<n>`` (a listening socket inherited
from the parent). Requests are HTTP/1.1 under ``/api/v1``, bodies are CH's JSON schemas, and
errors answer CH's shape, a JSON array of messages. Each connection is served by its own
thread (``api-conn``), so a long operation never holds up another call, and nothing here waits
for vCPUs. Slow clients cannot hold the threads: a request must arrive whole within
:data:`REQUEST_TIMEOUT` of its first byte (408), one client process may hold at most
:data:`MAX_CONNECTIONS_PER_PEER` connections (429), and when all :data:`MAX_CONNECTIONS` are
taken a new connection replaces the one that has waited longest for request bytes. The
document of what is served is :data:`OPENAPI_PATH` (``GET /api/v1/openapi``).

Status codes: 200 with a body, 204 without; 400 bad input (malformed HTTP or JSON, a config
vmmkit rejects or does not support yet, an unknown key, guest RAM the host cannot provide); 404
unknown path, no VM created, or no such device; 405 wrong method, or an operation the VM's
state does not allow (``vm.counters`` of a VM that is not running); 408 a request that did not
arrive in time; 409 a VM or a device id that already exists; 413 body too large; 429 too many
connections from one process, or a ``vm.resize`` while a vCPU removal is pending; 501 a CH
endpoint vmmkit does not implement (coredump, ...); 503 every connection busy in a
handler, or a ``--restore`` still building the VM after a minute (``vm.*`` requests wait for
it); 504 a guest that did not eject a device or vCPUs in time (``vm.remove-device``,
``vm.resize``); 500 only for failures inside the VMM. ``vm.add-disk`` / ``vm.add-net`` on a
running VM answer 200 with CH's ``PciDeviceInfo`` (``{"id": ..., "bdf": "0000:00:05.0"}``).
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from vmmkit.api.http import (
    ConnectionClosed,
    HttpError,
    Request,
    RequestReader,
    Response,
    close_fds,
)
from vmmkit.api.resize_ram import checked_ram
from vmmkit.config import (
    ConfigError,
    DeviceConfig,
    DiskConfig,
    FsConfig,
    GenericVhostUserConfig,
    NetConfig,
    OptionParser,
    PmemConfig,
    VmConfig,
    VsockConfig,
)
from vmmkit.errors import BootError, DeviceError, VmmError
from vmmkit.log import get_logger
from vmmkit.sandbox import API, enter_thread
from vmmkit.state import SnapshotError
from vmmkit.vmm import (
    AlreadyExists,
    EjectTimeout,
    InvalidState,
    NoSuchDevice,
    NotCreated,
    NotSupported,
    ResizePending,
    Restoring,
    Vmm,
)

log = get_logger()

API_ROOT: Final = "/api/v1/"
OPENAPI_PATH: Final = Path(__file__).with_name("openapi.yaml")
#: Connections served at once. When all are taken, a new connection takes the place of the
#: one that has waited longest for a request's bytes (idle or trickling); only when every
#: connection is inside a handler is the new one answered 503.
MAX_CONNECTIONS: Final = 64
#: Connections one client process (``SO_PEERCRED`` pid) may hold; more are answered 429.
MAX_CONNECTIONS_PER_PEER: Final = 16
#: Seconds a connection may stay silent between requests before it is closed: never by default.
#: Kata Containers' runtime-rs opens one connection when it starts the VMM and sends every call
#: of the sandbox's life on it (``ch-config/src/ch_api.rs``: one shared ``UnixStream``), hours
#: apart; an idle connection still gives way when all :data:`MAX_CONNECTIONS` are taken.
IDLE_TIMEOUT: Final[float | None] = None
#: Seconds from a request's first byte until all of it (head and body) must have arrived
#: (408 otherwise); bytes trickling in do not extend it.
REQUEST_TIMEOUT: Final = 10.0
#: Pending connections the kernel queues before ``accept``. A Unix socket refuses a connect at
#: once (``EAGAIN``) when this queue is full, so it is sized for bursts of clients (as Rust's
#: ``UnixListener``, which Cloud Hypervisor uses); the client retries ``EAGAIN`` too.
LISTEN_BACKLOG: Final = 128

#: Cloud Hypervisor endpoints vmmkit does not implement: they answer 501, never a silent success.
NOT_IMPLEMENTED: Final[Mapping[str, str]] = {
    "vm.add-vdpa": "vDPA devices",
    "vm.add-user-device": "userspace (vfio-user) devices",
    "vm.coredump": "guest core dumps",
}

_SOCKET_SPEC: Final = OptionParser("--api-socket", ("path", "fd"))

#: A handler answers a request; it may also return what to do once the answer is sent.
Handler = Callable[["ApiServer", Request], "Response | tuple[Response, Callable[[], None]]"]


@attrs.frozen
class Route:
    method: str
    handler: Handler
    takes_fds: bool = False


def _no_body(request: Request) -> None:
    if request.body.strip():
        raise HttpError(400, "this endpoint takes no request body")


def _json_object(request: Request) -> dict[str, Any]:
    if not request.body.strip():
        raise HttpError(400, "a JSON request body is required")
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", "", "*/*", "text/plain"):
        raise HttpError(415, f"the request body must be application/json, not {content_type[:60]!r}")
    try:
        value = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HttpError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return value


# -- handlers -----------------------------------------------------------------------------------


def _ping(server: ApiServer, request: Request) -> Response:
    _no_body(request)
    return Response.json(200, server.vmm.ping())


def _vmm_shutdown(server: ApiServer, request: Request) -> tuple[Response, Callable[[], None]]:
    _no_body(request)
    server.vmm.delete()
    return Response(204), server.vmm.shutdown_vmm  # the VMM exits once the answer is out


def _create(server: ApiServer, request: Request) -> Response:
    body = _json_object(request)
    if not isinstance(body.get("payload"), dict):
        raise HttpError(400, "payload: a VmConfig needs a payload object (kernel, firmware...)")
    nets = body.get("net")
    if isinstance(nets, list):
        for net in nets:
            if isinstance(net, dict) and net.get("fds"):
                log.warning("api.create_fds_ignored", fds=net["fds"],
                            hint="fds in a vm.create body are meaningless here; add taps with vm.add-net")
                net.pop("fds")
    server.vmm.create(VmConfig.from_json(body))
    return Response(204)


def _action(name: str) -> Handler:
    def handler(server: ApiServer, request: Request) -> Response:
        _no_body(request)
        getattr(server.vmm, name)()
        return Response(204)

    handler.__name__ = f"_{name}"
    return handler


def _info(server: ApiServer, request: Request) -> Response:
    _no_body(request)
    return Response.json(200, server.vmm.info())


def _counters(server: ApiServer, request: Request) -> Response:
    _no_body(request)
    return Response.json(200, server.vmm.counters())


def _added(result: Mapping[str, str] | None) -> Response:
    return Response(204) if result is None else Response.json(200, dict(result))


def _add_disk(server: ApiServer, request: Request) -> Response:
    return _added(server.vmm.add_disk(DiskConfig.from_json(_json_object(request), section="disks")))


def _add_device(server: ApiServer, request: Request) -> Response:
    return _added(server.vmm.add_device(DeviceConfig.from_json(_json_object(request), section="devices")))


def _add_net(server: ApiServer, request: Request) -> Response:
    fds = request.fds
    try:
        body = _json_object(request)
        body.pop("fds", None)  # fd numbers only mean something when sent with SCM_RIGHTS
        net = NetConfig.from_json(body, section="net")
    except BaseException:
        close_fds(fds)
        raise
    return _added(server.vmm.add_net(net, fds))  # the VMM owns the fds now


def _add_fs(server: ApiServer, request: Request) -> Response:
    return _added(server.vmm.add_fs(FsConfig.from_json(_json_object(request), section="fs")))


def _add_generic_vhost_user(server: ApiServer, request: Request) -> Response:
    body = GenericVhostUserConfig.from_json(_json_object(request), section="generic_vhost_user")
    return _added(server.vmm.add_generic_vhost_user(body))


def _add_vsock(server: ApiServer, request: Request) -> Response:
    return _added(server.vmm.add_vsock(VsockConfig.from_json(_json_object(request), section="vsock")))


def _add_pmem(server: ApiServer, request: Request) -> Response:
    return _added(server.vmm.add_pmem(PmemConfig.from_json(_json_object(request), section="pmem")))


def _remove_device(server: ApiServer, request: Request) -> Response:
    body = _json_object(request)
    device_id = body.get("id")
    if not isinstance(device_id, str) or not device_id:
        raise HttpError(400, "the body must be {\"id\": \"<device id>\"}")
    server.vmm.remove_device(device_id)
    return Response(204)


def _resize_disk(server: ApiServer, request: Request) -> Response:
    body = _json_object(request)
    disk_id, size = body.get("id"), body.get("desired_size")
    unknown = sorted(set(body) - {"id", "desired_size"})
    if unknown:
        raise HttpError(400, f"VmResizeDisk has no {', '.join(unknown)} (it takes id and desired_size)")
    if not isinstance(disk_id, str) or not disk_id:
        raise HttpError(400, "id: the id of the disk to resize is required")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise HttpError(400, "desired_size: a size in bytes (a positive integer) is required")
    server.vmm.resize_disk(disk_id, size)
    return Response(204)


def _snapshot(server: ApiServer, request: Request) -> Response:
    """``VmSnapshotConfig``: ``{"destination_url": "file:///dir"}``."""
    body = _json_object(request)
    unknown = sorted(set(body) - {"destination_url"})
    if unknown:
        raise HttpError(400, f"VmSnapshotConfig has no {', '.join(unknown)} (it takes destination_url)")
    url = body.get("destination_url")
    if not isinstance(url, str) or not url:
        raise HttpError(400, "destination_url: a file:///<directory> URL is required")
    server.vmm.snapshot(url)
    return Response(204)


def _restore(server: ApiServer, request: Request) -> Response:
    """``RestoreConfig``: ``source_url``, ``prefault``, ``resume``; the other keys of Cloud
    Hypervisor's schema (``memory_restore_mode``, ``zone_updates``) are refused by name."""
    body = _json_object(request)
    refused = {"memory_restore_mode": "memory restore modes (memory is always mapped on demand)",
               "zone_updates": "memory zones", "net_fds": "passing tap fds to a restored VM"}
    for key, reason in refused.items():
        if body.get(key) not in (None, [], False):
            raise HttpError(400, f"{key}: not supported yet ({reason})")
    unknown = sorted(set(body) - {"source_url", "prefault", "resume"} - set(refused))
    if unknown:
        raise HttpError(400, f"RestoreConfig has no {', '.join(unknown)} (it takes source_url, prefault, resume)")
    url = body.get("source_url")
    if not isinstance(url, str) or not url:
        raise HttpError(400, "source_url: a file:///<directory> URL is required")
    flags = {key: body.get(key, False) for key in ("prefault", "resume")}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise HttpError(400, f"{key}: true or false, not {value!r}")
    server.vmm.restore(url, prefault=flags["prefault"], resume=flags["resume"])
    return Response(204)


def _send_migration(server: ApiServer, request: Request) -> tuple[Response, Callable[[], None]]:
    """``SendMigrationData``: ``destination_url``, ``local``, ``downtime_ms``; the VMM exits
    once the answer is sent (:meth:`vmmkit.vmm.Vmm.send_migration`)."""
    from vmmkit.migration.api import send_migration_args

    url, local, downtime_ms = send_migration_args(_json_object(request))
    finish = server.vmm.send_migration(url, local=local, downtime_ms=downtime_ms)
    return Response(204), finish


def _receive_migration(server: ApiServer, request: Request) -> Response:
    """``ReceiveMigrationData``: ``receiver_url``; answers once the VM runs here."""
    from vmmkit.migration.api import receive_migration_args

    server.vmm.receive_migration(receive_migration_args(_json_object(request)))
    return Response(204)


#: ``VmResizeData``'s keys, and for those vmmkit does not implement yet, why (501).
_RESIZE_KEYS: Final[Mapping[str, str | None]] = {
    "desired_vcpus": None,
    "desired_ram": None,
    "desired_balloon": None,
}


def _resize(server: ApiServer, request: Request) -> Response:
    """``vm.resize`` (``VmResizeData``): every field present is checked, then carried out
    (:meth:`vmmkit.vmm.Vmm.resize`)."""
    body = _json_object(request)
    unknown = sorted(set(body) - set(_RESIZE_KEYS))
    if unknown:
        raise HttpError(400, f"VmResizeData has no {', '.join(unknown)} (it takes {', '.join(_RESIZE_KEYS)})")
    given = [key for key in _RESIZE_KEYS if body.get(key) is not None]
    if not given:
        raise HttpError(400, f"vm.resize needs one of {', '.join(_RESIZE_KEYS)}")
    for key in given:  # refuse before anything changes
        if _RESIZE_KEYS[key] is not None:
            raise HttpError(501, f"vm.resize {key} is not implemented by vmmkit ({_RESIZE_KEYS[key]})")
    count = body.get("desired_vcpus")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
        raise HttpError(400, f"desired_vcpus: a positive integer is required, not {count!r}")
    ram = checked_ram(body["desired_ram"]) if "desired_ram" in given else None
    server.vmm.resize(desired_vcpus=count, desired_ram=ram, desired_balloon=body.get("desired_balloon"))
    return Response(204)


def _resize_zone(server: ApiServer, request: Request) -> Response:
    """``vm.resize-zone`` (``VmResizeZone``: ``id``, ``desired_ram``; :mod:`vmmkit.vmm_zones`)."""
    body = _json_object(request)
    unknown = sorted(set(body) - {"id", "desired_ram"})
    if unknown:
        raise HttpError(400, f"VmResizeZone has no {', '.join(unknown)} (it takes id, desired_ram)")
    zone_id = body.get("id")
    if not isinstance(zone_id, str) or not zone_id:
        raise HttpError(400, "id: the id of the memory zone to resize is required")
    if "desired_ram" not in body:
        raise HttpError(400, "desired_ram: the zone's new size in bytes is required")
    server.vmm.resize_zone(zone_id, checked_ram(body["desired_ram"]))
    return Response(204)


def _openapi(server: ApiServer, request: Request) -> Response:
    _no_body(request)
    return Response(200, server.openapi_document(), content_type="application/yaml")


ROUTES: Final[Mapping[str, Route]] = {
    "vmm.ping": Route("GET", _ping),
    "vmm.shutdown": Route("PUT", _vmm_shutdown),
    "vm.create": Route("PUT", _create),
    "vm.boot": Route("PUT", _action("boot")),
    "vm.info": Route("GET", _info),
    "vm.counters": Route("GET", _counters),
    "vm.pause": Route("PUT", _action("pause")),
    "vm.resume": Route("PUT", _action("resume")),
    "vm.shutdown": Route("PUT", _action("shutdown")),
    "vm.reboot": Route("PUT", _action("reboot")),
    "vm.power-button": Route("PUT", _action("power_button")),
    "vm.delete": Route("PUT", _action("delete")),
    "vm.nmi": Route("PUT", _action("nmi")),
    "vm.add-disk": Route("PUT", _add_disk),
    "vm.add-net": Route("PUT", _add_net, takes_fds=True),
    "vm.add-device": Route("PUT", _add_device),
    "vm.add-vsock": Route("PUT", _add_vsock),
    "vm.add-pmem": Route("PUT", _add_pmem),
    "vm.add-fs": Route("PUT", _add_fs),
    "vm.add-generic-vhost-user": Route("PUT", _add_generic_vhost_user),
    "vm.remove-device": Route("PUT", _remove_device),
    "vm.resize-disk": Route("PUT", _resize_disk),
    "vm.snapshot": Route("PUT", _snapshot),
    "vm.restore": Route("PUT", _restore),
    "vm.resize": Route("PUT", _resize),
    "vm.send-migration": Route("PUT", _send_migration),
    "vm.receive-migration": Route("PUT", _receive_migration),
    "vm.resize-zone": Route("PUT", _resize_zone),
    "openapi": Route("GET", _openapi),
}


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, (NotCreated, NoSuchDevice)):
        return 404
    if isinstance(exc, InvalidState):
        return 405
    if isinstance(exc, AlreadyExists):
        return 409
    if isinstance(exc, NotSupported):
        return 501
    if isinstance(exc, EjectTimeout):
        return 504
    if isinstance(exc, ResizePending):
        return 429
    if isinstance(exc, Restoring):
        return 503
    if isinstance(exc, (ConfigError, BootError, DeviceError, SnapshotError)):
        return 400
    return 500


class ApiServer:
    """Serves :data:`ROUTES` for ``vmm`` on a listening Unix socket."""

    def __init__(self, vmm: Vmm, listener: socket.socket, *, path: str | None = None,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float | None = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT,
                 max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER) -> None:
        self.vmm = vmm
        self.path = path
        self._listener = listener
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._per_peer = max_connections_per_peer
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closing = threading.Event()
        #: Each connection and the time it started waiting for a request (None: in a handler).
        self._connections: dict[socket.socket, _Connection] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._openapi: bytes | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.requests_served = 0

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, spec: str, vmm: Vmm) -> ApiServer:
        """From an ``--api-socket`` value: ``path=<socket>`` (a bare path works too, as in CH)
        or ``fd=<n>``.

        :raises ConfigError: a malformed spec, or a socket that cannot be created or used.
        """
        if "=" not in spec and spec:
            spec = f"path={spec}"
        options = _SOCKET_SPEC.parse(spec)
        path, fd_text = options.get("path"), options.get("fd")
        if (path is None) == (fd_text is None):
            raise ConfigError("--api-socket", spec, "path=<socket path> or fd=<fd>")
        if path is not None:
            return cls(vmm, bind_unix_socket(path), path=path)
        fd = options.integer("fd", hi=0x7FFF_FFFF)
        assert fd is not None
        try:
            listener = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError("--api-socket", fd, "a Unix socket fd", reason=exc.strerror or str(exc)) from None
        if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
            listener.detach()
            raise ConfigError("--api-socket", fd, "a Unix stream socket fd")
        if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener.listen(LISTEN_BACKLOG)
        return cls(vmm, listener)

    # -- serving ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._accept_loop, name="api-server", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, close every connection and remove the socket file."""
        self._closing.set()
        try:
            os.write(self._wake_w, b"x")  # wakes the accept loop at once
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2)
        try:
            self._listener.close()
        except OSError:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.path is not None:
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass

    def _accept_loop(self) -> None:
        enter_thread(API, "api-server")
        while not self._closing.is_set():
            try:
                readable, _, _ = select.select([self._listener.fileno(), self._wake_r], [], [])
                if self._closing.is_set():
                    return
                if self._wake_r in readable:
                    continue
                conn, _ = self._listener.accept()
                conn.setblocking(True)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if self._closing.is_set():
                    return
                # Out of fds or memory, or a connection that died in the queue: the API must
                # outlive it (a returning loop would leave the socket queue to fill for good).
                log.warning("api.accept_failed", error=str(exc))
                self._closing.wait(0.1)
                continue
            try:
                self._admit(conn)
            except Exception as exc:  # one connection's trouble never stops the accept loop
                log.error("api.admit_failed", error=str(exc))
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        """Serve ``conn`` on its own thread, or refuse it (429, 503)."""
        peer = _peer_pid(conn)
        with self._lock:
            same_peer = sum(1 for c in self._connections.values() if c.peer == peer)
        if peer is not None and same_peer >= self._per_peer:
            self._refuse(conn, 429, f"too many connections from process {peer} (at most {self._per_peer})")
            return
        if not self._slots.acquire(blocking=False) and not self._evict_for_slot():
            self._refuse(conn, 503, "too many connections")
            return
        with self._lock:
            self._connections[conn] = _Connection(peer, time.monotonic())
        try:
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()
        except RuntimeError:
            self._release(conn)
            self._refuse(conn, 503, "too many connections")

    def _evict_for_slot(self) -> bool:
        """Close the connection that has waited longest for request bytes and take its slot
        (a slow or idle client must not lock out one with a request ready)."""
        with self._lock:
            waiting = [(c.waiting_since, sock) for sock, c in self._connections.items()
                       if c.waiting_since is not None and not c.evicted]
            if not waiting:
                return False
            _, victim = min(waiting, key=lambda pair: pair[0])
            self._connections[victim].evicted = True
        try:
            victim.shutdown(socket.SHUT_RDWR)  # its thread wakes, closes it and frees the slot
        except OSError:
            pass
        log.info("api.connection_evicted", reason="all connections taken")
        return self._slots.acquire(timeout=1.0)

    def _refuse(self, conn: socket.socket, status: int, message: str) -> None:
        try:
            conn.settimeout(0.5)
            conn.sendall(Response.error(status, message).encode(keep_alive=False))
        except OSError:
            pass
        conn.close()

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)
        self._slots.release()

    def _waiting(self, conn: socket.socket, waiting: bool) -> bool:
        """Mark ``conn`` as waiting for a request (an eviction candidate) or busy; False if it
        was evicted meanwhile."""
        with self._lock:
            state = self._connections.get(conn)
            if state is None or state.evicted:
                return False
            state.waiting_since = time.monotonic() if waiting else None
            return True

    def _serve(self, conn: socket.socket) -> None:
        enter_thread(API, "api-conn")
        reader = RequestReader(conn)
        try:
            while not self._closing.is_set():
                conn.settimeout(self._idle_timeout)
                try:
                    request = reader.read(self._request_timeout)
                except ConnectionClosed:
                    return
                except HttpError as exc:
                    self._send(conn, Response.error(exc.status, exc.message), keep_alive=False)
                    return
                except (OSError, TimeoutError, ValueError):
                    return
                if not self._waiting(conn, False):
                    close_fds(request.fds)
                    return
                response, after = self.handle(request)
                keep_alive = request.keep_alive and not self._closing.is_set()
                sent = self._send(conn, response, keep_alive=keep_alive)
                if after is not None:
                    after()
                if not (sent and keep_alive) or not self._waiting(conn, True):
                    return
        finally:
            reader.close_fds()
            self._release(conn)
            conn.close()

    @staticmethod
    def _send(conn: socket.socket, response: Response, *, keep_alive: bool) -> bool:
        try:
            conn.sendall(response.encode(keep_alive=keep_alive))
            return True
        except OSError:
            return False

    def handle(self, request: Request) -> tuple[Response, Callable[[], None] | None]:
        """The answer to one request, and what to do once it is sent (``vmm.shutdown``)."""
        route: Route | None = None
        try:
            route, name = self._route(request)
            if name.startswith("vm."):
                self.vmm.wait_restored()  # a --restore in progress: its VM, not a 404
            if not route.takes_fds and request.fds:
                log.warning("api.fds_ignored", endpoint=name, count=len(request.fds))
                close_fds(request.fds)
            result = route.handler(self, request)
            self.requests_served += 1
            if isinstance(result, tuple):
                return result[0], result[1]
            return result, None
        except Exception as exc:
            if route is None or not route.takes_fds:
                close_fds(request.fds)
            status = _status_of(exc)
            headers = getattr(exc, "headers", None)
            if status == 500:
                log.exception("api.request_failed", method=request.method, path=request.path)
            else:
                log.info("api.request_refused", method=request.method, path=request.path, status=status,
                         error=str(exc))
            return Response.error(status, _message(exc), headers=headers), None

    def _route(self, request: Request) -> tuple[Route, str]:
        path = request.path
        if not path.startswith(API_ROOT):
            raise HttpError(404, f"no such path: {path[:200]} (the API is under {API_ROOT})")
        name = path[len(API_ROOT) :]
        route = ROUTES.get(name)
        if route is None and name in NOT_IMPLEMENTED:
            route = Route("PUT", _not_implemented(name))
        if route is None:
            raise HttpError(404, f"no such endpoint: {name[:200]}")
        if request.method != route.method:
            error = HttpError(405, f"{name} takes {route.method}, not {request.method[:20]}")
            error.headers = {"Allow": route.method}  # type: ignore[attr-defined]
            raise error
        return route, name

    def openapi_document(self) -> bytes:
        if self._openapi is None:
            self._openapi = OPENAPI_PATH.read_bytes()
        return self._openapi


@attrs.define
class _Connection:
    peer: int | None  #: the client's pid (``SO_PEERCRED``)
    waiting_since: float | None  #: waiting for a request since (monotonic); None: in a handler
    evicted: bool = False


def _peer_pid(conn: socket.socket) -> int | None:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", creds)[0]
    return pid if pid > 0 else None


def _not_implemented(name: str) -> Handler:
    def handler(server: ApiServer, request: Request) -> Response:
        return Response.error(501, f"{name} is not implemented by vmmkit ({NOT_IMPLEMENTED[name]})")

    return handler


def _message(exc: BaseException) -> str:
    if isinstance(exc, HttpError):
        return exc.message
    if isinstance(exc, VmmError):
        return str(exc)
    return f"internal error: {type(exc).__name__}"


def bind_unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600. A stale socket left by a dead VMM is
    replaced; one that a live VMM answers on is not.

    :raises ConfigError: the path is in use or cannot be bound.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ConfigError("--api-socket", path, "a usable socket path", reason=exc.strerror or str(exc)) from None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ConfigError("--api-socket", path, "a new path or a stale socket",
                              reason=f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(0.5)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
        else:
            raise ConfigError("--api-socket", path, "a socket no other VMM is using",
                              reason=f"{path} is in use")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError as exc:
        listener.close()
        raise ConfigError("--api-socket", path, "a path the socket can be created at",
                          reason=exc.strerror or str(exc)) from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    listener.listen(LISTEN_BACKLOG)
    return listener
