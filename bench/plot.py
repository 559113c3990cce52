"""Draw the trend of every benchmark from its JSON records (``bench/results/*.json``).

One SVG per benchmark (``exits`` records are split by ``arch``), one panel per measurement, one
line per row: a row is identified by its record's ``keys`` fields (``bench/record.py``), and every
other numeric field of it is a measurement plotted against the record's ``time``. Records
written before ``keys`` existed get the keys of :data:`LEGACY_KEYS`.

The SVG is written by hand, with no plotting library: the trend must be drawable wherever the
benchmarks run (CI, a fresh checkout, the lab), and matplotlib is not among the project's
dependencies. Open the files in any browser.

    python bench/plot.py [--results bench/results] [--out bench/results/plots] [--bench launch]
                         [--where peer=vmmkit] [--metric median_ms]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

HERE = Path(__file__).resolve().parent

#: Row keys of the records written before ``bench/record.py`` put them in each record.
LEGACY_KEYS: dict[str, tuple[str, ...]] = {
    "blk": ("storage", "cache", "transport", "peer", "op", "qd"),
    "net": ("transport", "peer", "metric", "unit"),
    "exits": ("path", "kind"),
    "hotplug": ("step", "milestone"),
}

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


@dataclass
class Point:
    time: datetime.datetime
    value: float
    source: str  #: the record's file name


@dataclass
class Panel:
    """One measurement of one benchmark: series label -> points in time order."""

    title: str
    series: dict[str, list[Point]] = field(default_factory=dict)


class RecordError(ValueError):
    pass


def load_records(paths: Iterable[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The records among ``paths`` and a warning for each file that is not one."""
    records, warnings = [], []
    for path in sorted(paths):
        try:
            record = json.loads(path.read_text())
            _check(record)
        except (OSError, ValueError) as exc:
            warnings.append(f"{path.name}: skipped ({exc})")
            continue
        record["_source"] = path.name
        records.append(record)
    return records, warnings


def _check(record: Any) -> None:
    if not isinstance(record, dict):
        raise RecordError("not a JSON object")
    for name, kind in (("bench", str), ("time", str), ("rows", list)):
        if not isinstance(record.get(name), kind):
            raise RecordError(f"no {name!r} ({kind.__name__})")
    parse_time(record["time"])


def parse_time(text: str) -> datetime.datetime:
    try:
        when = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        raise RecordError(f"time {text!r} is not YYYY-MM-DDTHH:MM:SS+ZZZZ") from None
    return when.astimezone(datetime.UTC)


def group_name(record: dict[str, Any]) -> str:
    arch = record.get("arch")
    return f"{record['bench']}-{arch}" if isinstance(arch, str) else str(record["bench"])


def record_keys(record: dict[str, Any]) -> tuple[str, ...]:
    keys = record.get("keys")
    if isinstance(keys, list) and all(isinstance(key, str) for key in keys):
        return tuple(keys)
    if record["bench"] in LEGACY_KEYS:
        return LEGACY_KEYS[record["bench"]]
    # unknown and old: text fields name a row, numbers are measured
    return tuple(sorted({name for row in record["rows"] if isinstance(row, dict)
                         for name, value in row.items() if isinstance(value, str)}))


def panels(records: Sequence[dict[str, Any]], where: dict[str, str] | None = None,
           metrics: Sequence[str] = ()) -> dict[str, list[Panel]]:
    """Group name -> its panels, one per measurement, series sorted by label."""
    grouped: dict[str, dict[str, Panel]] = {}
    for record in sorted(records, key=lambda r: parse_time(r["time"])):
        when = parse_time(record["time"])
        keys = record_keys(record)
        group = grouped.setdefault(group_name(record), {})
        for row in record["rows"]:
            if not isinstance(row, dict):
                continue
            if where and any(str(row.get(name)) != value for name, value in where.items()):
                continue
            label = " / ".join(str(row[key]) for key in keys if row.get(key) is not None) or "(all)"
            for name, value in row.items():
                if name in keys or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if not math.isfinite(value) or (metrics and name not in metrics):
                    continue
                panel = group.setdefault(name, Panel(name))
                panel.series.setdefault(label, []).append(Point(when, float(value), record["_source"]))
    return {name: [group[metric] for metric in sorted(group)] for name, group in sorted(grouped.items()) if group}


# -- SVG ------------------------------------------------------------------------------------

WIDTH, PLOT_H, LEFT, RIGHT_LEGEND, TOP, GAP = 980, 220, 70, 330, 30, 50


def svg(title: str, panel_list: Sequence[Panel]) -> str:
    """A standalone SVG document: the panels stacked, each with its axes and legend."""
    parts: list[str] = []
    y = TOP + 10
    for panel in panel_list:
        height = max(PLOT_H, 16 * len(panel.series) + 20)
        parts.append(_panel(panel, y, height))
        y += height + GAP
    total_h = y
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{total_h}" '
            f'viewBox="0 0 {WIDTH} {total_h}" font-family="sans-serif" font-size="11">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n'
            f'<text x="{LEFT}" y="{TOP - 8}" font-size="15" font-weight="bold">{escape(title)}</text>\n')
    return head + "".join(parts) + "</svg>\n"


def _panel(panel: Panel, top: float, height: float) -> str:
    plot_w = WIDTH - LEFT - RIGHT_LEGEND
    points = [point for series in panel.series.values() for point in series]
    t0 = min(point.time for point in points).timestamp()
    t1 = max(point.time for point in points).timestamp()
    low, high = _range([point.value for point in points])
    plot_h = PLOT_H - 30

    def x_of(when: datetime.datetime) -> float:
        return LEFT + (plot_w / 2 if t1 == t0 else (when.timestamp() - t0) / (t1 - t0) * plot_w)

    def y_of(value: float) -> float:
        return top + plot_h - (value - low) / (high - low) * plot_h

    out = [f'<g class="panel" data-metric="{escape(panel.title)}">\n',
           f'<text x="{LEFT}" y="{top - 6}" font-size="13">{escape(panel.title)}</text>\n',
           f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>\n']
    for tick in _ticks(low, high):
        ty = y_of(tick)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 4}" y="{ty + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>\n')
    for when, anchor in ((min(p.time for p in points), "start"), (max(p.time for p in points), "end")):
        out.append(f'<text x="{x_of(when) if t1 != t0 else LEFT + (0 if anchor == "start" else plot_w):.1f}" '
                   f'y="{top + plot_h + 14}" text-anchor="{anchor}">{when:%Y-%m-%d %H:%M}</text>\n')
    for index, (label, series) in enumerate(sorted(panel.series.items())):
        color = PALETTE[index % len(PALETTE)]
        dash = "" if index < len(PALETTE) else ' stroke-dasharray="4 2"'
        coords = " ".join(f"{x_of(p.time):.1f},{y_of(p.value):.1f}" for p in series)
        out.append(f'<g class="series" data-label="{escape(label, {chr(34): "&quot;"})}">')
        if len(series) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.5"{dash}/>')
        for p in series:
            out.append(f'<circle cx="{x_of(p.time):.1f}" cy="{y_of(p.value):.1f}" r="2.5" fill="{color}">'
                       f'<title>{escape(label)}: {_fmt(p.value)} ({p.time:%Y-%m-%d %H:%M}, {escape(p.source)})'
                       '</title></circle>')
        ly = top + 10 + 16 * index
        out.append(f'<line x1="{LEFT + plot_w + 12}" x2="{LEFT + plot_w + 30}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{LEFT + plot_w + 34}" y="{ly}">{escape(_shorten(label))} '
                   f'(last {_fmt(series[-1].value)})</text></g>\n')
    out.append("</g>\n")
    return "".join(out)


def _range(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if low == high:
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.08
    return (0.0 if low >= 0 and low - pad < 0 else low - pad), high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _shorten(label: str, width: int = 44) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=HERE / "results", help="directory of the JSON records")
    parser.add_argument("--out", type=Path, default=None, help="where the SVGs go (default: <results>/plots)")
    parser.add_argument("--bench", action="append", default=[], help="only this benchmark (repeatable)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only rows whose field KEY is VALUE (repeatable)")
    parser.add_argument("--metric", action="append", default=[], help="only this measurement (repeatable)")
    args = parser.parse_args(argv)
    where = {}
    for condition in args.where:
        name, sep, value = condition.partition("=")
        if not sep or not name:
            parser.error(f"--where: KEY=VALUE, not {condition!r}")
        where[name] = value
    if not args.results.is_dir():
        parser.error(f"--results: {args.results} is not a directory")
    records, warnings = load_records(args.results.glob("*.json"))
    for warning in warnings:
        print(f"plot: {warning}", file=sys.stderr)
    if args.bench:
        records = [record for record in records if record["bench"] in args.bench]
    drawn = panels(records, where, args.metric)
    if not drawn:
        print(f"plot: nothing to draw from {len(records)} record(s) in {args.results}", file=sys.stderr)
        return 1
    out = args.out or args.results / "plots"
    out.mkdir(parents=True, exist_ok=True)
    for name, panel_list in drawn.items():
        count = len({p.source for panel in panel_list for s in panel.series.values() for p in s})
        path = out / f"{name}.svg"
        path.write_text(svg(f"{name}: {count} run(s)", panel_list))
        print(f"{path}: {len(panel_list)} measurement(s), "
              f"{len({label for panel in panel_list for label in panel.series})} row(s), {count} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
