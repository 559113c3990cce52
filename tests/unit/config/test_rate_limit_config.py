"""Rate limit options (``--disk``/``--net`` ``bw_*``/``ops_*``, ``--rate-limit-group``, JSON
``rate_limiter_config`` / ``rate_limit_group`` / ``rate_limit_groups``): accepted as Cloud Hypervisor
writes them, and every hostile value refused with a clear message: the real ``vmmkit`` command
exits 2, the real API server answers 400."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmmkit.api.client import ApiClient
from vmmkit.api.server import ApiServer, bind_unix_socket
from vmmkit.config import ConfigError, RateLimiterConfig, RateLimitGroupConfig, TokenBucket, VmConfig
from vmmkit.vmm import Vmm


def test_cli_groups_and_disks_parse_as_ch_writes_them() -> None:
    config = VmConfig.from_cli(
        rate_limit_groups=["id=g0,bw_size=1000,bw_one_time_burst=500,bw_refill_time=100,ops_size=5,ops_refill_time=10"],
        disks=["path=a.img,rate_limit_group=g0", "path=b.img,rate_limit_group=g0"],
        net=["tap=t0,bw_size=100,bw_refill_time=10"],
    )
    assert config.rate_limit_groups == (RateLimitGroupConfig(id="g0", rate_limiter_config=RateLimiterConfig(
        bandwidth=TokenBucket(size=1000, one_time_burst=500, refill_time=100),
        ops=TokenBucket(size=5, one_time_burst=0, refill_time=10))),)
    assert [d.rate_limit_group for d in config.disks] == ["g0", "g0"]
    assert config.net[0].rate_limiter_config == RateLimiterConfig(
        bandwidth=TokenBucket(size=100, one_time_burst=0, refill_time=10))
    assert VmConfig.from_json(config.to_json()) == config
    assert config.to_json()["rate_limit_groups"] == [{"id": "g0", "rate_limiter_config": {
        "bandwidth": {"size": 1000, "one_time_burst": 500, "refill_time": 100},
        "ops": {"size": 5, "one_time_burst": 0, "refill_time": 10}}}]


HOSTILE_CLI = [
    (["--disk", "path=a.img,bw_size=0,bw_refill_time=10"], "--disk: invalid value '0' for bw_size"),
    (["--disk", "path=a.img,bw_size=10,bw_refill_time=0"], "--disk: invalid value '0' for bw_refill_time"),
    (["--disk", "path=a.img,bw_size=-5,bw_refill_time=10"], "--disk: invalid value '-5' for bw_size"),
    (["--disk", "path=a.img,ops_size=1,ops_refill_time=18446744073709551616"],
     "--disk: invalid value '18446744073709551616' for ops_refill_time"),
    (["--disk", "path=a.img,bw_size=1M,bw_refill_time=10"], "--disk: invalid value '1M' for bw_size"),
    (["--disk", "path=a.img,bw_size=1000"], "--disk: bw_refill_time missing"),
    (["--disk", "path=a.img,ops_one_time_burst=5"], "--disk: ops_size missing"),
    (["--net", "tap=t0,ops_size=0,ops_refill_time=1"], "--net: invalid value '0' for ops_size"),
    (["--disk", "path=a.img,rate_limit_group=nope"], "--disk: no rate limit group 'nope'"),
    (["--disk", "path=a.img,bw_size=1,bw_refill_time=1,rate_limit_group=g", "--rate-limit-group",
      "id=g,bw_size=1,bw_refill_time=1"], "--disk: invalid value 'g' for rate_limit_group"),
    (["--rate-limit-group", "bw_size=1,bw_refill_time=1"], "--rate-limit-group: missing id"),
    (["--rate-limit-group", "id=g"], "--rate-limit-group: a rate limit group without limits"),
    (["--rate-limit-group", "id=g,bw_size=0,bw_refill_time=5"], "--rate-limit-group: invalid value '0' for bw_size"),
    (["--rate-limit-group", "id=g,ops_size=1,ops_refill_time=1",
      "--rate-limit-group", "id=g,ops_size=2,ops_refill_time=1"], "--rate-limit-group: duplicate rate limit group 'g'"),
]


@pytest.mark.parametrize(("args", "message"), HOSTILE_CLI, ids=[m for _, m in HOSTILE_CLI])
def test_hostile_cli_values_exit_2_naming_the_key(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vmmkit", "--kernel", "/nonexistent/vmlinux", *args],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vmmkit: error: {message}"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def client(vmmkit_registries: Any, vmmkit_pm: Any) -> Iterator[ApiClient]:
    """The real API server (an in-process Vmm) on a Unix socket."""
    directory = Path(tempfile.mkdtemp(prefix="vk-rl-", dir="/tmp"))
    vmm = Vmm(registries=vmmkit_registries, plugin_manager=vmmkit_pm)
    path = str(directory / "api.sock")
    server = ApiServer(vmm, bind_unix_socket(path), path=path, idle_timeout=5.0)
    server.start()
    yield ApiClient(path, timeout=10.0)
    server.close()
    vmm.close()
    directory.rmdir()


def bucket(**values: Any) -> dict[str, Any]:
    return {"rate_limiter_config": {"bandwidth": {"size": 1000, "refill_time": 100, **values}}}


BW = "rate_limit_groups[0].rate_limiter_config.bandwidth"
HOSTILE_JSON = [
    ({"rate_limit_groups": [{"id": "g", **bucket(size=0)}]}, f"{BW}.size"),
    ({"rate_limit_groups": [{"id": "g", **bucket(size=-1)}]}, f"{BW}.size"),
    ({"rate_limit_groups": [{"id": "g", **bucket(refill_time=2**64)}]},
     f"{BW}.refill_time"),
    ({"rate_limit_groups": [{"id": "g", **bucket(size="10")}]}, f"{BW}.size"),
    ({"rate_limit_groups": [{"id": "g"}]}, "rate_limit_groups[0]"),
    ({"rate_limit_groups": [{"id": "g", **bucket()}, {"id": "g", **bucket()}]}, "duplicate rate limit group 'g'"),
    ({"disks": [{"path": "/a", "rate_limit_group": "nope"}]}, "disks[0].rate_limit_group: no rate limit group 'nope'"),
    ({"disks": [{"path": "/a", "rate_limiter_config": {"ops": {"size": 1}}}]}, "disks[0].rate_limiter_config.ops"),
    ({"net": [{"tap": "t", "rate_limiter_config": {"ops": {"size": 1, "refill_time": 0}}}]},
     "net[0].rate_limiter_config.ops.refill_time"),
]


@pytest.mark.parametrize(("body", "named"), HOSTILE_JSON, ids=[n for _, n in HOSTILE_JSON])
def test_hostile_json_answers_400(client: ApiClient, body: dict[str, Any], named: str) -> None:
    response = client.request("PUT", "vm.create", {"payload": {"kernel": "/k"}, **body}, check=False)
    assert response.status == 400, response.body
    assert named in response.json()[0]
    assert client.request("GET", "vm.info", check=False).status == 404


def test_vm_create_with_groups_and_add_disk_naming_one(client: ApiClient) -> None:
    body = {"payload": {"kernel": "/k"}, "rate_limit_groups": [{"id": "g", **bucket()}]}
    assert client.request("PUT", "vm.create", body, check=False).status == 204
    bad = client.request("PUT", "vm.add-disk", {"path": "/a", "rate_limit_group": "other"}, check=False)
    assert bad.status == 400 and "no rate limit group 'other'" in bad.json()[0]
    bad = client.request("PUT", "vm.add-disk", {"path": "/a", **bucket(size=0)}, check=False)
    assert bad.status == 400 and "rate_limiter_config.bandwidth.size" in bad.json()[0]
    negative = {"tap": "t", "rate_limiter_config": {"ops": {"size": -3, "refill_time": 1}}}
    bad = client.request("PUT", "vm.add-net", negative, check=False)
    assert bad.status == 400 and "rate_limiter_config.ops.size" in bad.json()[0]
    in_group = {"path": "/a", "rate_limit_group": "g"}
    assert client.request("PUT", "vm.add-disk", in_group, check=False).status in (200, 204)
    assert client.request("PUT", "vm.add-net", {"tap": "t", **bucket()}, check=False).status in (200, 204)
    config = client.request("GET", "vm.info").json()["config"]
    assert config["rate_limit_groups"][0]["id"] == "g"
    assert config["disks"][0]["rate_limit_group"] == "g"
    assert config["net"][0]["rate_limiter_config"]["bandwidth"]["size"] == 1000


def test_token_bucket_config_refuses_zero() -> None:
    with pytest.raises(ConfigError, match="size"):
        TokenBucket(size=0, refill_time=1)
    with pytest.raises(ConfigError, match="refill_time"):
        TokenBucket(size=1, refill_time=0)
