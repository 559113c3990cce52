"""Find the installed plugins of an entry-point group without ``importlib.metadata``.

``importlib.metadata`` (what pluggy's ``load_setuptools_entrypoints`` uses) costs 20-40 ms to
import on a small VM host (it brings ``email``, ``zipfile``, ``csv``...), more than the rest of a
VM's start-up. Installed distributions are directories ``<name>-<version>.dist-info`` (or
``*.egg-info``) on ``sys.path``; their ``entry_points.txt`` is a small INI file. This module reads
those the way ``importlib.metadata.entry_points()`` does: ``sys.path`` in order, ``""`` meaning the
current directory, the first distribution of a (normalised) name winning. Only the name and
version of a distribution are read from its metadata, and only when asked for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple

_METADATA_DIR_SUFFIXES = (".dist-info", ".egg-info")


class EntryPoint(NamedTuple):
    name: str
    value: str  # "package.module" or "package.module:attribute"
    group: str
    dist_path: str  # the .dist-info / .egg-info directory

    def load(self) -> object:
        import importlib

        module_name, _, attribute = self.value.partition(":")
        target: object = importlib.import_module(module_name.strip())
        for part in attribute.strip().split(".") if attribute.strip() else ():
            target = getattr(target, part)
        return target

    @property
    def dist(self) -> Distribution:
        return Distribution(self.dist_path)


class Distribution:
    """An installed distribution's name and version, read from its metadata file on demand."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _field(self, key: str) -> str | None:
        for filename in ("METADATA", "PKG-INFO"):
            try:
                with open(os.path.join(self.path, filename), encoding="utf-8") as stream:
                    for line in stream:
                        if not line.strip():
                            break  # the headers end at the first blank line
                        field, _, value = line.partition(":")
                        if field.strip().lower() == key:
                            return value.strip()
            except OSError:
                continue
        return None

    @property
    def project_name(self) -> str:
        return self._field("name") or _split_dir_name(os.path.basename(self.path))[0]

    @property
    def version(self) -> str:
        return self._field("version") or _split_dir_name(os.path.basename(self.path))[1] or "?"


def entry_points(group: str, path: Iterable[str] | None = None) -> list[EntryPoint]:
    """The entry points of ``group`` in the distributions found on ``path`` (``sys.path``)."""
    found: list[EntryPoint] = []
    seen: set[str] = set()
    for dist_path in _metadata_dirs(sys.path if path is None else path):
        name = _normalise(_split_dir_name(os.path.basename(dist_path))[0])
        if name in seen:
            continue
        seen.add(name)
        try:
            with open(os.path.join(dist_path, "entry_points.txt"), encoding="utf-8") as stream:
                text = stream.read()
        except OSError:
            continue
        found.extend(EntryPoint(ep_name, value, group, dist_path) for ep_name, value in _section(text, group))
    return found


def _metadata_dirs(path: Iterable[str]) -> Iterator[str]:
    for entry in path:
        directory = entry or "."
        try:
            names = sorted(os.listdir(directory))
        except OSError:  # missing, not a directory, or a zip file
            continue
        for name in names:
            if name.endswith(_METADATA_DIR_SUFFIXES):
                yield os.path.join(directory, name)


def _section(text: str, group: str) -> Iterator[tuple[str, str]]:
    """``(name, value)`` pairs of INI section ``[group]``."""
    inside = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
            continue
        if inside and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()


def _split_dir_name(dir_name: str) -> tuple[str, str]:
    """``("vmmkit_kvm", "0.1.0")`` from ``vmmkit_kvm-0.1.0.dist-info``; egg-info may lack a version."""
    stem = dir_name.rsplit(".", 1)[0]
    name, _, rest = stem.partition("-")
    return name, rest.split("-")[0]


def _normalise(name: str) -> str:
    # PEP 503 normalisation, as importlib.metadata's Prepared.normalize does
    out = []
    for char in name.lower():
        out.append("-" if char in "-_." else char)
    normalised = "".join(out)
    while "--" in normalised:
        normalised = normalised.replace("--", "-")
    return normalised
