"""The vhost-user protocol (QEMU ``docs/interop/vhost-user.rst``), shared by vmmkit's frontends
and backends: see :mod:`vmmkit.vhost_user.protocol`."""
