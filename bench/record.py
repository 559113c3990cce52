"""One JSON record per benchmark run, in ``bench/results/``, for the trend ``bench/plot.py`` draws.

A record is one JSON object (the shape ``bench/blk.py``, ``net.py``, ``exits.py`` and
``hotplug.py`` already write)::

    {"bench": "launch", "time": "2026-12-07T21:00:00+0000", "seconds": 42.0,
     "args": {...}, "load": [1.0, 0.8, 0.5], "host": "...",
     "keys": ["peer", "measure"], "rows": [{"peer": "vmmkit", "measure": "...", "ms": 61.2}, ...]}

``keys`` names the fields that identify a row from one run to the next; every other numeric
field of a row is a measurement, plotted over ``time``. Any further top-level field (a QEMU
version, a kernel) is kept as given.

    from record import write_record
    write_record("launch", rows, keys=("peer", "measure"), args=args, started=started)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def default_path(bench: str, when: float | None = None) -> Path:
    """``bench/results/<bench>-<UTC time>.json``."""
    return RESULTS / time.strftime(f"{bench}-%Y%m%dT%H%M%S.json", time.gmtime(when))


def make_record(bench: str, rows: Sequence[Mapping[str, Any]], *, keys: Iterable[str],
                args: argparse.Namespace | Mapping[str, Any] | None = None, started: float | None = None,
                **extra: Any) -> dict[str, Any]:
    """The record of one run; ``started`` is the ``time.monotonic()`` the run began at."""
    keys = list(keys)
    for row in rows:
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(f"{bench}: a row lacks its key field(s) {missing}: {dict(row)}")
    arguments = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {
        "bench": bench,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": None if started is None else round(time.monotonic() - started, 3),
        "args": {name: _plain(value) for name, value in arguments.items() if name != "json"},
        "load": list(os.getloadavg()),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        **extra,
        "keys": keys,
        "rows": [dict(row) for row in rows],
    }


def write_record(bench: str, rows: Sequence[Mapping[str, Any]], *, keys: Iterable[str],
                 args: argparse.Namespace | Mapping[str, Any] | None = None, started: float | None = None,
                 path: str | Path | None = None, **extra: Any) -> Path | None:
    """Write the record to ``path`` (default :func:`default_path`; ``"-"``: print it on stdout,
    for a run whose files are thrown away, e.g. inside the lab) and say where. Returns the file
    written, or None for ``"-"``."""
    record = make_record(bench, rows, keys=keys, args=args, started=started, **extra)
    text = json.dumps(record, indent=1) + "\n"
    if str(path) == "-":
        print("--- json ---\n" + text + "--- end json ---")
        return None
    target = Path(path) if path is not None else default_path(bench)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(target)
    print(f"results: {target}")
    return target


def _plain(value: Any) -> Any:
    """JSON-safe: paths and other objects as strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value)
