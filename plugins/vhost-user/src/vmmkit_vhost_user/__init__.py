"""vmmkit-vhost-user: vmmkit's own vhost-user backends, as separate processes.

``vmmkit-vhost-user fs --socket-path PATH --shared-dir DIR`` is a virtio-fs daemon in the
manner of virtiofsd: it serves one vhost-user frontend (QEMU's ``vhost-user-fs-pci``, Cloud
Hypervisor's or vmmkit's ``--fs``) on a Unix socket and answers the guest's FUSE requests
(:mod:`vmmkit_vhost_user.fuse`) from the shared directory, the only part of the host it can
reach (:mod:`vmmkit_vhost_user.passthrough`). ``blk`` serves a disk image
(:mod:`vmmkit_vhost_user.blk`), ``net`` a tap (:mod:`vmmkit_vhost_user.net`). The vhost-user side
is :mod:`vmmkit_vhost_user.backend`.
"""

from __future__ import annotations

__version__ = "0.1.0"
