"""vhost-user frontends: virtio devices whose data path is a vhost-user backend process
(QEMU ``docs/interop/vhost-user.rst``; Cloud Hypervisor ``virtio-devices/src/vhost_user/``).

:mod:`.connection` speaks the protocol to one backend, :mod:`.device` is the virtio device that
hands it the guest's memory and rings, :mod:`.blk`, :mod:`.net` and :mod:`.fs` are the device
types' ``create`` functions."""
