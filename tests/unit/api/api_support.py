"""Helpers for the API tests: the two OpenAPI documents, schema checks of requests and
answers, and a raw HTTP exchange over a Unix socket (for malformed input)."""

from __future__ import annotations

import functools
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import strategies as st

from vmmkit.api.server import OPENAPI_PATH

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED = REPO_ROOT.parent / "shared"
CH_SPEC = SHARED / "specs" / "cloud-hypervisor.yaml"


@functools.cache
def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def served_document() -> dict[str, Any]:
    """The OpenAPI document vmmkit serves (vmmkit/api/openapi.yaml)."""
    return _load(OPENAPI_PATH)


def ch_document() -> dict[str, Any]:
    """Cloud Hypervisor's OpenAPI document from ../shared, or a skip saying why not."""
    if not CH_SPEC.is_file():
        pytest.skip(f"{CH_SPEC} is absent: Cloud Hypervisor's API document lives in the team's ../shared")
    return _load(CH_SPEC)


def check_schema(document: dict[str, Any], schema: dict[str, Any], value: Any) -> None:
    """Validate ``value`` against ``schema`` (an OpenAPI 3.0 schema that may ``$ref`` into
    ``document``'s components). Raises ``jsonschema.ValidationError``."""
    from openapi_schema_validator import OAS30Validator

    root = {**schema, "components": document["components"]}
    OAS30Validator(root).validate(value)


def check_request(document: dict[str, Any], endpoint: str, method: str, body: Any) -> None:
    """``body`` is a valid request body of ``method /endpoint`` in ``document``."""
    op = document["paths"][f"/{endpoint}"][method.lower()]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    check_schema(document, schema, body)


def check_response(document: dict[str, Any], endpoint: str, method: str, status: int, body: bytes,
                   content_type: str | None = None) -> None:
    """The answer is one ``document`` lists for ``method /endpoint``, with a valid body."""
    op = document["paths"][f"/{endpoint}"][method.lower()]
    responses = {str(code): value for code, value in op["responses"].items()}
    assert str(status) in responses, f"{method} /{endpoint}: status {status} is not documented ({body[:200]!r})"
    content = responses[str(status)].get("content")
    if not content:
        assert body == b"", f"{method} /{endpoint} {status}: undocumented body {body[:200]!r}"
        return
    if "application/json" in content:
        if content_type is not None:
            assert content_type.startswith("application/json"), content_type
        check_schema(document, content["application/json"]["schema"], json.loads(body))


def raw_exchange(path: str, data: bytes, *, timeout: float = 5.0, half_close: bool = True) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes (or ``timeout``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first (oversized input)
        out = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def statuses(raw: bytes) -> list[int]:
    """The status codes of the HTTP answers in ``raw`` (one after another on a connection)."""
    out = []
    while raw.startswith(b"HTTP/1.1 "):
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            break
        head = raw[:end].split(b"\r\n")
        status = int(head[0].split(b" ")[1])
        out.append(status)
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if status == 100:
            length = 0
        raw = raw[end + 4 + length :]
    assert not raw, f"trailing bytes after the answers: {raw[:200]!r}"
    return out


# -- hypothesis strategies for request bodies ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
config_keys = st.sampled_from(["payload", "cpus", "memory", "disks", "net", "serial", "console", "platform",
                               "rng", "id", "path", "fds", "kernel", "size", "boot_vcpus", "mac", "num_queues"])
structured_bodies = st.one_of(
    json_values,
    st.dictionaries(config_keys, json_values, max_size=6),
    st.fixed_dictionaries({"payload": st.dictionaries(st.sampled_from(["kernel", "cmdline"]), json_values)},
                          optional={"memory": st.dictionaries(st.just("size"), json_values),
                                    "cpus": st.dictionaries(st.sampled_from(["boot_vcpus", "max_vcpus"]),
                                                            json_values)}),
)


def from_schema(document: dict[str, Any], schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped by an OpenAPI schema of ``document`` (types, properties, enums), with
    some plain wrong values mixed in: structured input that reaches deep into the handlers."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document["components"]["schemas"][name]
    wrong = json_values if depth < 3 else st.none()
    kind = schema.get("type")
    if "enum" in schema:
        right: st.SearchStrategy[Any] = st.sampled_from(schema["enum"])
    elif kind == "object" or "properties" in schema:
        properties = schema.get("properties", {})
        if depth >= 3 or not properties:
            right = st.dictionaries(st.text(max_size=8), st.none(), max_size=2)
        else:
            right = st.fixed_dictionaries(
                {key: from_schema(document, schema["properties"][key], depth + 1)
                 for key in schema.get("required", []) if key in properties},
                optional={key: from_schema(document, value, depth + 1)
                          for key, value in properties.items() if key not in schema.get("required", [])},
            )
    elif kind == "array":
        right = st.lists(from_schema(document, schema.get("items", {}), depth + 1), max_size=3)
    elif kind == "integer":
        right = st.integers(-1, 2**64) | st.sampled_from([0, 1, 2, 4, 128, 256, 1 << 20, 64 << 20])
    elif kind == "boolean":
        right = st.booleans()
    elif kind == "string":
        right = st.text(max_size=24) | st.sampled_from(["/dev/null", "/tmp/x.img", "12:34:56:78:9a:bc",
                                                        "192.168.1.1", "255.255.255.0", "Raw", "_disk0"])
    else:
        right = json_values
    return st.one_of(right, right, right, wrong)  # mostly well-shaped


def request_bodies(document: dict[str, Any], endpoint: str) -> st.SearchStrategy[Any]:
    """Bodies for ``PUT /endpoint`` from ``document``'s request schema (``None`` if it has none)."""
    (operation,) = document["paths"][f"/{endpoint}"].values()
    body = operation.get("requestBody")
    if body is None:
        return st.none()
    return from_schema(document, body["content"]["application/json"]["schema"])
