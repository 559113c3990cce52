"""The sandbox's pieces on their own: the allow lists, the filters libseccomp compiles (run in
a thread of this process), Landlock's ABI probe and rules, the configuration."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from vmmkit import sandbox
from vmmkit.config import ConfigError, LandlockConfig, VmConfig
from vmmkit.errors import VmmError
from vmmkit.sandbox import landlock, syscalls


def in_thread(target: Any) -> Any:
    """Run ``target`` in a new thread (filters and domains never leave it) and return its result."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_no_kind_allows_a_forbidden_call() -> None:
    for kind in syscalls.KINDS:
        assert not syscalls.allowed(kind) & syscalls.FORBIDDEN, kind
    assert "socket" not in syscalls.allowed(syscalls.VCPU)
    assert "socket" not in syscalls.allowed(syscalls.DEVICE)
    assert "socket" in syscalls.allowed(syscalls.API)


def test_a_kind_that_starts_another_allows_what_that_kind_needs() -> None:
    extra = {syscalls.DEVICE: ["mknodat"]}
    for kind in (syscalls.VCPU, syscalls.EVENT_LOOP, syscalls.API, syscalls.VMM, syscalls.DEVICE):
        assert "mknodat" in syscalls.allowed(kind, extra), kind
    assert syscalls.allowed(syscalls.DEVICE) <= syscalls.allowed(syscalls.VCPU)
    assert syscalls.allowed(syscalls.VCPU) <= syscalls.allowed(syscalls.API)


def test_plugins_cannot_open_what_is_never_allowed() -> None:
    with pytest.raises(VmmError, match="execve"):
        sandbox.activate_seccomp("true", {"device": ["execve"]})
    with pytest.raises(VmmError, match="unknown thread kind"):
        sandbox.activate_seccomp("true", {"gpu": ["socket"]})
    with pytest.raises(VmmError, match="--seccomp"):
        sandbox.check_mode("yes")


def test_a_filtered_thread_shows_its_filter_and_name_in_proc() -> None:
    sandbox.activate_seccomp("true")
    try:
        def filtered() -> tuple[int, str]:
            sandbox.enter_thread("device", "unit-dev")
            tid = threading.get_native_id()
            status = Path(f"/proc/self/task/{tid}/status").read_text()
            os.getpid()
            return sandbox.seccomp_mode_of_thread(), status

        mode, status = in_thread(filtered)
        assert mode == 2 and "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        assert "Name:\tunit-dev" in status
        assert sandbox.seccomp_mode_of_thread() == 0  # this thread is not touched
    finally:
        sandbox.activate_seccomp("false")


def test_log_mode_lets_a_missing_call_through() -> None:
    sandbox.activate_seccomp("log")
    try:
        def logged() -> bool:
            sandbox.enter_thread("vcpu", "unit-vcpu")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM):
                return True

        assert in_thread(logged)
    finally:
        sandbox.activate_seccomp("false")


def test_threads_started_without_an_active_policy_stay_unfiltered() -> None:
    sandbox.activate_seccomp("false")

    def unfiltered() -> int:
        sandbox.enter_thread("vcpu", "unit-free")
        return sandbox.seccomp_mode_of_thread()

    assert in_thread(unfiltered) == 0


def test_landlock_abi_is_probed_and_a_domain_blocks_what_no_rule_names(tmp_path: Path) -> None:
    try:
        abi = landlock.abi_version()
    except landlock.LandlockUnavailable as exc:
        assert "--landlock" in str(exc)
        pytest.skip(str(exc))
    assert abi >= 1
    allowed_dir = tmp_path / "allowed"
    allowed_dir.mkdir()
    (allowed_dir / "ok").write_text("ok")
    (tmp_path / "secret").write_text("secret")
    ruleset = landlock.create_ruleset([*landlock.runtime_rules(), landlock.Rule(str(allowed_dir), "r")])
    try:
        def confined() -> tuple[str, str]:
            landlock.restrict_self(ruleset)
            try:
                (tmp_path / "secret").read_text()
                secret = "read"
            except PermissionError:
                secret = "denied"
            return (allowed_dir / "ok").read_text(), secret

        assert in_thread(confined) == ("ok", "denied")
        assert (tmp_path / "secret").read_text() == "secret"  # this thread is not confined
    finally:
        os.close(ruleset)


def test_landlock_without_a_kernel_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoLandlock:
        @staticmethod
        def vmmkit_landlock_abi() -> int:
            return -38

    monkeypatch.setattr(landlock, "_native", lambda: NoLandlock)
    with pytest.raises(landlock.LandlockUnavailable, match="--landlock: the kernel has no Landlock"):
        landlock.abi_version()


def test_landlock_configuration() -> None:
    config = VmConfig.from_cli(kernel="/k", disks=["path=/d.img,readonly=on"], landlock_enable=True,
                               landlock_rules=["path=/srv/images,access=rw"])
    assert config.landlock_rules == (LandlockConfig(path="/srv/images", access="rw"),)
    assert VmConfig.from_json(config.to_json()) == config
    rules = {(rule.path, rule.access) for rule in landlock.vm_rules(config)}
    assert {("/k", "r"), ("/d.img", "r"), ("/srv/images", "rw")} <= rules
    with pytest.raises(ConfigError, match="access"):
        LandlockConfig.parse("path=/x,access=rwx")
    with pytest.raises(ConfigError, match="Landlock rules without Landlock"):
        VmConfig.from_cli(kernel="/k", landlock_rules=["path=/x,access=r"])
