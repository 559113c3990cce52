"""vmmkit.entrypoints must find what importlib.metadata finds (it replaces it at start-up)."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from vmmkit.entrypoints import entry_points
from vmmkit.plugin import make_plugin_manager, plugin_label


@pytest.mark.parametrize("group", ["vmmkit", "console_scripts", "pytest11"])
def test_installed_entry_points_match_importlib_metadata(group: str) -> None:
    ours = sorted((ep.name, ep.value) for ep in entry_points(group))
    reference = sorted((ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group))
    assert ours == reference


def _dist(site: Path, dir_name: str, entry_points_txt: str | None, metadata: str | None = None) -> Path:
    path = site / dir_name
    path.mkdir()
    if entry_points_txt is not None:
        (path / "entry_points.txt").write_text(entry_points_txt)
    if metadata is not None:
        (path / ("PKG-INFO" if dir_name.endswith(".egg-info") else "METADATA")).write_text(metadata)
    return path


def test_synthetic_site_matches_importlib_metadata(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    _dist(first, "alpha_plugin-1.0.dist-info", "[vmmkit]\nalpha = alpha.plugin\n\n[other]\nx = y\n",
          "Metadata-Version: 2.1\nName: alpha-plugin\nVersion: 1.0\n\nbody: Name: wrong\n")
    _dist(first, "beta.egg-info", "# comment\n[vmmkit]\nbeta = beta.mod:hooks\n",
          "Metadata-Version: 1.0\nName: beta\nVersion: 2.3\n")
    _dist(first, "no_entry_points-0.1.dist-info", None)
    _dist(first, "empty-0.1.dist-info", "")
    # the same distribution again later on the path: the first one wins, as in importlib.metadata
    _dist(second, "Alpha.Plugin-9.9.dist-info", "[vmmkit]\nshadowed = never.loaded\n")
    (second / "not-a-dist.txt").write_text("x")
    path = [str(first), str(tmp_path / "missing"), str(second)]

    ours = sorted((ep.name, ep.value) for ep in entry_points("vmmkit", path))
    context = importlib.metadata.DistributionFinder.Context(path=path)
    dists = importlib.metadata.distributions(context=context)
    reference = sorted({(ep.name, ep.value) for d in dists for ep in d.entry_points if ep.group == "vmmkit"}
                       - {("shadowed", "never.loaded")})
    assert ours == reference == [("alpha", "alpha.plugin"), ("beta", "beta.mod:hooks")]
    labels = {ep.name: (ep.dist.project_name, ep.dist.version) for ep in entry_points("vmmkit", path)}
    assert labels == {"alpha": ("alpha-plugin", "1.0"), "beta": ("beta", "2.3")}


def test_entry_point_load_resolves_module_and_attribute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "ep_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("class Holder:\n    value = 42\n")
    site = tmp_path / "site"
    site.mkdir()
    _dist(site, "ep_probe-1.0.dist-info", "[vmmkit]\nmod = ep_probe_pkg.mod\nattr = ep_probe_pkg.mod:Holder.value\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = {ep.name: ep.load() for ep in entry_points("vmmkit", [str(site)])}
    assert loaded["mod"] is sys.modules["ep_probe_pkg.mod"]
    assert loaded["attr"] == 42


def test_plugin_manager_labels_entry_point_plugins_with_their_distribution() -> None:
    pm = make_plugin_manager()
    labels = {plugin_label(pm, plugin) for plugin in pm.get_plugins()}
    installed = {ep.dist.name: ep.dist.version for ep in importlib.metadata.entry_points(group="vmmkit")}
    assert {f"{name} {version}" for name, version in installed.items()} <= labels
