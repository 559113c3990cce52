"""The virtio-fs device (virtio 1.2, section 5.11) behind the vhost-user backend: queue 0 is the
hiprio queue (FORGET, BATCH_FORGET), queues 1.. the request queues; every chain carries one
FUSE request, answered by :class:`~vmmkit_vhost_user.passthrough.PassthroughFs`.
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import Final

from vmmkit.virtio.chain import DescriptorChain
from vmmkit_vhost_user import fuse
from vmmkit_vhost_user.passthrough import MAX_WRITE, PassthroughFs

#: The tag's room in ``struct virtio_fs_config``.
TAG_SIZE: Final = 36
#: The largest request read from a chain: a WRITE of max_write and its headers, with room.
MAX_REQUEST: Final = MAX_WRITE + 4096
log = logging.getLogger("vmmkit_vhost_user")
_CONFIG = struct.Struct(f"<{TAG_SIZE}sI")


def check_tag(tag: str) -> bytes:
    """The tag as the config space holds it; ``ValueError`` if it cannot be one."""
    raw = tag.encode()
    if not raw or len(raw) > TAG_SIZE or b"\0" in raw:
        raise ValueError(f"tag {tag!r} must be 1 to {TAG_SIZE} bytes without NUL")
    return raw


class VirtioFs:
    """A virtio-fs device serving ``shared_dir``."""

    name = "virtio-fs"
    inflight = False  # FUSE requests are not idempotent: no resubmission after a restart

    def __init__(self, shared_dir: str, *, tag: str | None = None, request_queues: int = 1) -> None:
        self.fs = PassthroughFs(shared_dir)
        self.tag = check_tag(tag) if tag is not None else None
        self.request_queues = request_queues
        self.num_queues = 1 + request_queues

    def device_features(self) -> int:
        return 0

    def set_features(self, features: int) -> None:
        pass  # no device feature bits

    def config(self) -> bytes | None:
        if self.tag is None:
            return None
        return _CONFIG.pack(self.tag, self.request_queues)

    def handle(self, queue_index: int, chain: DescriptorChain) -> int:
        request = chain.read(MAX_REQUEST)
        room = chain.writable_bytes
        reply = self.fs.handle(request, room)
        if reply is None or room == 0:
            return 0
        if len(reply) > room:  # the guest left too little room for this reply
            unique = fuse.IN_HEADER.unpack_from(request)[2]
            reply = fuse.reply(unique, error=errno.ERANGE)
            if len(reply) > room:
                return 0
        return chain.write(reply)

    def reset(self) -> None:
        if self.fs.requests:
            summary = " ".join(f"{name}={count}" for name, count in sorted(self.fs.requests.items()))
            log.info("FUSE requests served: %s", summary)
            self.fs.requests.clear()
        self.fs.close()
