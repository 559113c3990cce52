"""virtio-vsock with Cloud Hypervisor's hybrid (Unix socket) backend: :mod:`.device` (the
virtio device), :mod:`.muxer` (streams to host sockets), :mod:`.connection` (one stream's state
and credit), :mod:`.packet` (headers and their checks), :mod:`.loop` (the device's thread)."""
