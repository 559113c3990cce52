"""Hook contracts, with plugins written inline as a third party would write them."""

from __future__ import annotations

import types

import pytest

from vmmkit import hookimpl
from vmmkit.errors import PluginError, RegistryError
from vmmkit.hypervisor import Availability, Hypervisor
from vmmkit.plugin import collect_registries, make_plugin_manager


def backend(name: str, priority: int, usable: bool, reason: str = "", arches: tuple[str, ...] = ("x86_64",)):
    return type(
        f"{name.title()}Hypervisor",
        (Hypervisor,),
        {
            "name": name,
            "priority": priority,
            "architectures": arches,
            "is_available": classmethod(lambda cls: Availability(usable, reason)),
            "create_vm": lambda self, arch: None,
        },
    )


def plugin_registering(*backends: type[Hypervisor]) -> types.SimpleNamespace:
    class Plugin:
        @hookimpl
        def vmmkit_register_hypervisors(self, registry):  # noqa: ANN001
            for item in backends:
                registry.add(item)

    return Plugin()


def registries_for(*plugins: object):
    return collect_registries(make_plugin_manager(autoload=False, plugins=plugins))


def test_auto_picks_the_first_usable_backend_by_priority_not_registration_order() -> None:
    slow = backend("soft", 90, True)
    fast = backend("hard", 10, True)
    registries = registries_for(plugin_registering(slow), plugin_registering(fast))
    assert registries.select_hypervisor("auto", "x86_64") is fast


def test_auto_skips_unusable_backends_and_explains_when_none_is_left() -> None:
    hard = backend("hard", 10, False, "/dev/hard not found")
    registries = registries_for(plugin_registering(hard, backend("arm", 20, True, arches=("aarch64",))))
    with pytest.raises(RegistryError, match=r"hard: /dev/hard not found; arm: cannot run x86_64 guests"):
        registries.select_hypervisor("auto", "x86_64")


def test_unknown_names_list_what_is_registered() -> None:
    registries = registries_for(plugin_registering(backend("kvmish", 10, True), backend("other", 20, True)))
    with pytest.raises(RegistryError, match=r"unknown hypervisor 'nosuch' \(registered: kvmish, other\)"):
        registries.select_hypervisor("nosuch")


def test_a_name_registered_twice_is_an_error_naming_both_plugins() -> None:
    with pytest.raises(RegistryError, match="registered twice"):
        registries_for(plugin_registering(backend("dup", 10, True)), plugin_registering(backend("dup", 20, True)))


def test_a_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def vmmkit_register_hypervisor(self, registry):  # noqa: ANN001  (missing "s")
            pass

    with pytest.raises(PluginError, match="vmmkit_register_hypervisor"):
        make_plugin_manager(autoload=False, plugins=[Typo()])


def test_disabled_plugins_are_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMMKIT_DISABLE_PLUGINS", "blocked-one, other")
    pm = make_plugin_manager(autoload=False)
    assert pm.is_blocked("blocked-one") and pm.is_blocked("other")
    pm.register(plugin_registering(backend("x", 1, True)), name="blocked-one")
    assert collect_registries(pm).hypervisors.names() == []


def test_the_first_loader_that_recognises_an_image_wins() -> None:
    calls = []

    class Declines:
        @hookimpl
        def vmmkit_load_kernel(self, arch, path, header, memory, config, layout):  # noqa: ANN001
            calls.append("declines")
            return None

    class Accepts:
        @hookimpl
        def vmmkit_load_kernel(self, arch, path, header, memory, config, layout):  # noqa: ANN001
            calls.append("accepts")
            return "boot-info"

    pm = make_plugin_manager(autoload=False, plugins=[Accepts(), Declines()])
    result = pm.hook.vmmkit_load_kernel(arch="x86_64", path=None, header=b"", memory=None, config=None, layout=None)
    assert result == "boot-info"
    assert calls == ["declines", "accepts"]


def test_the_registry_records_which_plugin_registered_what() -> None:
    pm = make_plugin_manager(autoload=False)
    pm.register(plugin_registering(backend("mine", 10, True)), name="my-plugin")
    assert collect_registries(pm).hypervisors.owner("mine") == "my-plugin"

