"""vmmkit's management API: Cloud Hypervisor's REST API over a Unix socket.

- :mod:`vmmkit.api.server`: the server (``vmmkit --api-socket path=...``);
- :mod:`vmmkit.api.client`: :class:`~vmmkit.api.client.ApiClient`, which ``vmmkit-remote`` and
  tests use, and which can pass file descriptors (tap devices) with a request;
- ``openapi.yaml``: the OpenAPI document of what vmmkit serves (``GET /api/v1/openapi``),
  derived from Cloud Hypervisor's.
"""
