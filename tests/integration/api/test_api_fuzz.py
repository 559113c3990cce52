"""Hammer a live VMM's socket while the test guest runs: garbage bytes, requests shaped by the
served OpenAPI document, odd methods and paths. No answer is a 500, the VMM never dies, and
the guest keeps making progress. Time-bounded (about 20 s)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from api_support import raw_exchange, request_bodies, served_document, statuses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmmkit.api.client import ApiClient
from vmmkit.api.server import NOT_IMPLEMENTED, ROUTES

from .conftest import VmmProcess, wait_for

pytestmark = pytest.mark.requires_kvm

#: Endpoints that would end or stop the guest: not fuzzed here (their refusals are tested elsewhere).
DISRUPTIVE = {"vmm.shutdown", "vm.shutdown", "vm.delete", "vm.reboot", "vm.power-button", "vm.pause", "vm.nmi"}
ENDPOINTS = sorted((set(ROUTES) | set(NOT_IMPLEMENTED)) - DISRUPTIVE)
ALLOWED = {200, 204, 400, 404, 405, 409, 413, 415, 431, 501, 505}
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture
def running(vmm: VmmProcess, selftest_elf: Path) -> VmmProcess:
    vmm.create(vmm.guest_config(selftest_elf))
    vmm.remote("boot")
    wait_for(lambda: vmm.heartbeats() >= 1, what="a heartbeat")
    return vmm


def check_alive(vmm: VmmProcess) -> None:
    assert vmm.proc.poll() is None, vmm.log.read_text()[-3000:]
    assert ApiClient(str(vmm.socket), timeout=5).info()["state"] == "Running"


@st.composite
def documented_requests(draw: st.DrawFn) -> tuple[str, str, Any]:
    document = served_document()
    endpoint = draw(st.sampled_from(ENDPOINTS))
    (method,) = document["paths"][f"/{endpoint}"]
    method = draw(st.sampled_from([method.upper()] * 4 + ["GET", "PUT", "POST", "DELETE"]))
    body = draw(request_bodies(document, endpoint))
    return method, endpoint, body


def test_the_running_guest_survives_a_fuzzed_socket(running: VmmProcess) -> None:
    path = str(running.socket)
    started = time.monotonic()
    before = running.heartbeats()
    answers: dict[int, int] = {}

    @FUZZ
    @given(data=st.binary(max_size=1024))
    def garbage(data: bytes) -> None:
        for status in statuses(raw_exchange(path, data, timeout=2)):
            assert status in ALLOWED
            answers[status] = answers.get(status, 0) + 1

    @FUZZ
    @given(request=documented_requests())
    def documented(request: tuple[str, str, Any]) -> None:
        method, endpoint, body = request
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} /api/v1/{endpoint} HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        codes = statuses(raw_exchange(path, head + data, timeout=5))
        assert len(codes) == 1
        assert codes[0] in ALLOWED, (method, endpoint, body)
        answers[codes[0]] = answers.get(codes[0], 0) + 1

    garbage()
    check_alive(running)
    documented()
    check_alive(running)
    assert time.monotonic() - started < 60
    assert 500 not in answers
    assert answers.get(400, 0) > 10 and answers.get(501, 0) + answers.get(409, 0) > 0, answers
    wait_for(lambda: running.heartbeats() > before, what="heartbeats after the fuzzing")
    config = ApiClient(path).info()["config"]
    assert config["payload"]["cmdline"] == "test=spin"  # nothing the fuzzer sent changed the VM
