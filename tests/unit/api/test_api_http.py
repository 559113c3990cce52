"""Hostile input at the HTTP layer: malformed requests, oversized or non-JSON bodies, garbage
bytes and half-closed connections get a 4xx or a closed connection, never a 500, and the server
keeps answering. Hypothesis generates raw bytes and structured requests."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from api_support import raw_exchange, statuses, structured_bodies
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmkit.api.client import ApiClient
from vmmkit.api.http import MAX_BODY_BYTES, MAX_HEADER_BYTES
from vmmkit.api.server import NOT_IMPLEMENTED, ROUTES, ApiServer


def path_of(server: ApiServer) -> str:
    assert server.path is not None
    return server.path


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /api/v1/vmm.ping HTTP/2.0\r\n\r\n", 505),
        (b"GET /api/v1/vmm.ping\r\n\r\n", 400),
        (b"GET http://x/api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: \xff\xfe\r\n\r\n", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 501),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1), 413),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":", 400),  # truncated
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 4\r\n\r\n\xff\xfe\x00\x01", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 5\r\n\r\nnull!", 400),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\n{}", 415),
        (b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X-Long: " + b"a" * MAX_HEADER_BYTES + b"\r\n\r\n", 431),
        (b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 10\r\n\r\n" + b"[" * 5 + b"]" * 5, 400),
    ],
    ids=["garbage", "http2", "no-version", "absolute-uri", "header-without-colon", "binary-header",
         "negative-length", "conflicting-lengths", "chunked", "body-too-large", "truncated-body",
         "binary-body", "not-json", "wrong-content-type", "header-too-large", "json-array"],
)
def test_malformed_requests_get_a_4xx_or_501(server: ApiServer, data: bytes, expected: int) -> None:
    raw = raw_exchange(path_of(server), data)
    assert statuses(raw) == [expected], raw[:300]


def test_deeply_nested_json_is_400(server: ApiServer) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    raw = raw_exchange(path_of(server), b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                       % (len(body), body))
    assert statuses(raw) == [400]


def test_huge_integers_are_400(client: ApiClient) -> None:
    body = b'{"payload": {"kernel": "k"}, "memory": {"size": ' + b"9" * 5000 + b"}}"
    assert client.request("PUT", "vm.create", raw_body=body, check=False).status == 400


def test_a_half_closed_connection_without_a_request_is_just_closed(server: ApiServer) -> None:
    assert raw_exchange(path_of(server), b"") == b""
    partial = raw_exchange(path_of(server), b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost")
    assert statuses(partial) in ([], [400])


def test_keep_alive_serves_several_requests_on_one_connection(server: ApiServer) -> None:
    request = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = raw_exchange(path_of(server), request * 3 + b"GET /api/v1/vm.info HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert statuses(raw) == [200, 200, 200, 404]


def test_expect_100_continue(server: ApiServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path_of(server))
        sock.sendall(b"PUT /api/v1/vm.create HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"{}")
        assert b"HTTP/1.1 400" in sock.recv(1000)  # {} has no payload kernel: still valid JSON


def test_too_many_fds_are_refused(server: ApiServer) -> None:
    import array
    import os

    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(path_of(server))
            fds = array.array("i", [read_end] * 200)
            data = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n"
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            assert b"HTTP/1.1 400" in sock.recv(1000)
    finally:
        os.close(read_end)
        os.close(write_end)


# -- hypothesis -----------------------------------------------------------------------------------

ENDPOINTS = sorted(ROUTES) + sorted(NOT_IMPLEMENTED) + ["vm.bogus", "", "vmm.ping/.."]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_served(server: ApiServer, raw: bytes) -> None:
    codes = statuses(raw)
    assert 500 not in codes, raw[:500]
    for code in codes:
        assert code in (200, 204, 400, 404, 405, 409, 413, 415, 431, 501, 505), raw[:500]
    ping = ApiClient(path_of(server)).request("GET", "vmm.ping", check=False)
    assert ping.status == 200


@FUZZ
@given(data=st.binary(max_size=2048))
def test_garbage_bytes_never_get_a_500(server: ApiServer, data: bytes) -> None:
    assert_served(server, raw_exchange(path_of(server), data, timeout=2))


@FUZZ
@given(method=st.sampled_from(["GET", "PUT", "POST", "PATCH", "HEAD"]), endpoint=st.sampled_from(ENDPOINTS),
       body=structured_bodies, headers=st.dictionaries(
           st.sampled_from(["Content-Type", "Connection", "Accept", "X-Any", "Expect"]),
           st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30), max_size=3))
def test_structured_requests_never_get_a_500(server: ApiServer, method: str, endpoint: str, body: Any,
                                              headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    head = [f"{method} /api/v1/{endpoint} HTTP/1.1", f"Content-Length: {len(data)}",
            *(f"{k}: {v}" for k, v in headers.items() if k != "Expect")]
    raw = raw_exchange(path_of(server), ("\r\n".join(head) + "\r\n\r\n").encode() + data, timeout=2)
    assert_served(server, raw)
    server.vmm.delete()  # start each example without a VM
