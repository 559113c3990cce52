"""bench/plot.py draws the trend of sample records, and bench/record.py writes records it reads."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
sys.path.insert(0, str(BENCH))

import plot  # noqa: E402
import record  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def _write(directory: Path, name: str, body: object) -> None:
    (directory / name).write_text(json.dumps(body))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Three launch runs written by record.py, two legacy blk records, one broken file."""
    directory = tmp_path / "results"
    directory.mkdir()
    for hour, (vmmkit, qemu) in enumerate(((190.0, 87.0), (120.0, 85.0), (80.0, 86.0))):
        rows = [{"peer": "vmmkit", "measure": "cold: first byte", "median_ms": vmmkit, "min_ms": vmmkit - 5},
                {"peer": "qemu microvm", "measure": "cold: first byte", "median_ms": qemu, "min_ms": qemu - 3}]
        made = record.make_record("launch", rows, keys=("peer", "measure"), args={"runs": 10})
        made["time"] = f"2026-12-0{hour + 1}T10:00:00+0000"
        _write(directory, f"launch-{hour}.json", made)
    for day, rate in ((3, 20.9), (5, 31.5)):
        _write(directory, f"blk-{day}.json", {
            "bench": "blk", "time": f"2026-12-0{day}T12:00:00+0100",
            "rows": [{"storage": "shm", "cache": "cached", "transport": "mmio", "peer": "vmmkit", "op": "read",
                      "qd": 1, "mib_s": rate, "latency_us": 280.0}]})
    (directory / "broken.json").write_text("{not json")
    return directory


def test_plot_draws_one_line_per_row_and_panel_per_measurement(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "broken.json: skipped" in done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["blk.svg", "launch.svg"]

    launch = ET.parse(out / "launch.svg").getroot()
    metrics = [g.get("data-metric") for g in launch.iter(f"{SVG}g") if g.get("class") == "panel"]
    assert metrics == ["median_ms", "min_ms"]
    median = next(g for g in launch.iter(f"{SVG}g") if g.get("data-metric") == "median_ms")
    series = {g.get("data-label"): g for g in median.iter(f"{SVG}g") if g.get("class") == "series"}
    assert set(series) == {"vmmkit / cold: first byte", "qemu microvm / cold: first byte"}
    vmmkit_line = series["vmmkit / cold: first byte"].find(f"{SVG}polyline")
    assert vmmkit_line is not None
    points = [tuple(map(float, pair.split(","))) for pair in (vmmkit_line.get("points") or "").split()]
    assert len(points) == 3
    xs, ys = [x for x, _ in points], [y for _, y in points]
    assert xs == sorted(xs) and len(set(xs)) == 3  # in time order
    assert ys == sorted(ys)  # 190 -> 120 -> 80 ms: falling values sit lower and lower (larger y)
    tooltips = [t.text for t in series["vmmkit / cold: first byte"].iter(f"{SVG}title")]
    assert tooltips[-1] is not None and tooltips[-1].startswith("vmmkit / cold: first byte: 80 (2026-12-03")

    blk = ET.parse(out / "blk.svg").getroot()  # legacy records: keys from LEGACY_KEYS, qd among them
    labels = {g.get("data-label") for g in blk.iter(f"{SVG}g") if g.get("class") == "series"}
    assert labels == {"shm / cached / mmio / vmmkit / read / 1"}
    assert [g.get("data-metric") for g in blk.iter(f"{SVG}g") if g.get("class") == "panel"] == ["latency_us", "mib_s"]


def test_plot_filters_and_says_when_nothing_matches(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--results", str(results), "--out", str(out),
                           "--bench", "launch", "--where", "peer=vmmkit", "--metric", "median_ms"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    root = ET.parse(out / "launch.svg").getroot()
    assert [g.get("data-label") for g in root.iter(f"{SVG}g") if g.get("class") == "series"] == \
        ["vmmkit / cold: first byte"]
    none = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--results", str(results), "--out", str(out),
                           "--where", "peer=crosvm"], capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and "nothing to draw" in none.stderr
    bad = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--results", str(results), "--where", "peer"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_record_refuses_rows_without_their_keys_and_writes_atomically(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="key field"):
        record.make_record("launch", [{"peer": "vmmkit", "median_ms": 1.0}], keys=("peer", "measure"))
    path = record.write_record("launch", [{"peer": "vmmkit", "measure": "m", "median_ms": 1.0}],
                               keys=("peer", "measure"), args={"path": tmp_path}, path=tmp_path / "r.json")
    assert path == tmp_path / "r.json" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    written = json.loads(path.read_text())
    assert written["keys"] == ["peer", "measure"] and written["args"] == {"path": str(tmp_path)}
    plot.parse_time(written["time"])  # the format plot.py reads
