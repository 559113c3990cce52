"""``vmmkit --restore``: until the VM is built, ``vm.*`` requests wait for it instead of
answering 404 "no VM" (a client asks ``vm.info`` as soon as ``vmm.ping`` answers; issue #21),
and answer 503 if the restore outlasts the wait. ``vmm.*`` requests never wait."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from vmmkit.api.client import ApiClient, ApiError
from vmmkit.vmm import Vmm


def test_vm_requests_wait_for_a_restore_in_progress(vmm: Vmm, client: ApiClient) -> None:
    vmm.expect_restore()
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append(client.request("GET", "vm.info", check=False).status)
        except ApiError as exc:  # pragma: no cover - reported below
            answers.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    assert client.request("GET", "vmm.ping").status == 200  # the VMM answers meanwhile
    time.sleep(0.5)
    assert answers == [], "vm.info answered while the restore was still in progress"
    vmm.restore_ended()  # this restore built nothing: the answer is now the usual 404
    asking.join(10)
    assert answers == [404]


def test_a_restore_that_outlasts_the_wait_answers_503(vmm: Vmm, client: ApiClient,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    original = Vmm.wait_restored
    monkeypatch.setattr(Vmm, "wait_restored", lambda self, timeout=0.2: original(self, timeout))
    vmm.expect_restore()
    response = client.request("GET", "vm.info", check=False)
    assert response.status == 503 and "being restored" in response.json()[0]
    vmm.restore_ended()
    assert client.request("GET", "vm.info", check=False).status == 404
