"""The ``vmmkit`` command: boot a VM from Cloud Hypervisor-style options, or list plugins.

    vmmkit [options]          boot the VM the options describe (``--kernel`` required)
    vmmkit --api-socket path=<socket> [options]
                              serve the management API (Cloud Hypervisor's); without
                              ``--kernel``, wait for ``vm.create`` (see :mod:`vmmkit.api`)
    vmmkit run [options]      the same; with no ``--kernel`` boots the bundled demo guest
    vmmkit plugins            list plugins, what they register, and backend availability
    vmmkit launcher serve|stop|status
                              the pre-forked launcher (see :mod:`vmmkit.launcher`): with a
                              server running, ``vmmkit`` forks its VMM from the server

Exit status: the guest's (0 after a clean power-off), 1 when the VM or the VMM failed,
2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from vmmkit import __version__

_log_stream: TextIO | None = None

EXIT_USAGE = 2
EXIT_FAILURE = 1

# Cloud Hypervisor's VM options: (flag, VmConfig.from_cli keyword, repeatable, help).
_VM_OPTIONS: tuple[tuple[str, str, bool, str], ...] = (
    ("--kernel", "kernel", False, "kernel image: ELF vmlinux (PVH or 64-bit entry), bzImage, arm64 Image"),
    ("--cmdline", "cmdline", False, "kernel command line"),
    ("--initramfs", "initramfs", False, "initramfs (cpio, optionally compressed)"),
    ("--firmware", "firmware", False, "firmware image"),
    ("--cpus", "cpus", False, "boot=<n>,max=<n>,topology=<t>:<c>:<d>:<s>,features=..."),
    ("--memory", "memory", False, "size=<bytes>[KMG],shared=on|off,hugepages=on|off,hotplug_size=..."),
    ("--memory-zone", "memory_zones", True, "id=<zone>,size=<bytes>,file=<path>,shared=on|off,hotplug_size=..."),
    ("--disk", "disks", True, "path=<image>,readonly=on|off,direct=on|off,serial=<id>,id=<id>,..."),
    ("--net", "net", True, "tap=<name>,fd=[...],mac=<mac>,ip=<ip>,mask=<mask>,id=<id>,..."),
    ("--rng", "rng", False, "src=<entropy source> (default /dev/urandom)"),
    ("--serial", "serial", False, "off|null|tty|pty|file=<path>|socket=<path> (default tty)"),
    ("--console", "console", False, "virtio-console: off|null|tty|pty|file=<path>|socket=<path> (default off)"),
    ("--fs", "fs", True, "tag=<tag>,socket=<vhost-user socket>,..."),
    ("--generic-vhost-user", "generic_vhost_user", True, "socket=<vhost-user socket>,virtio_id=<id>,queue_sizes=[..]"),
    ("--pmem", "pmem", True, "file=<path>,size=<size>,..."),
    ("--vsock", "vsock", False, "cid=<cid>,socket=<path>"),
    ("--device", "devices", True, "path=<VFIO sysfs path>,id=<id>"),
    ("--platform", "platform", False, "virtio_transport=pci|mmio,..."),
    ("--balloon", "balloon", False, "size=<size>,deflate_on_oom=on|off,free_page_reporting=on|off"),
    ("--rate-limit-group", "rate_limit_groups", True, "id=<id>,bw_size=,bw_refill_time=,ops_size=,..."),
)

# Cloud Hypervisor's options for what vmmkit's VmConfig does not model: (flag, JSON path in
# vmmkit.config.NOT_SUPPORTED, takes a value). Each is refused by name, never ignored.
_UNMODELLED_OPTIONS: tuple[tuple[str, str, bool], ...] = (
    ("--igvm", "payload.igvm", True),
    ("--host-data", "payload.host_data", True),
    ("--numa", "numa", True),
    ("--vdpa", "vdpa", True),
    ("--user-device", "user_devices", True),
    ("--tpm", "tpm", True),
    ("--pci-segment", "pci_segments", True),
)


def main(argv: Sequence[str] | None = None) -> int:
    # The command (not the library) caches attrs' generated methods: see vmmkit._codecache.
    from vmmkit import _codecache

    _codecache.install()
    status = _dispatch(list(sys.argv[1:] if argv is None else argv))
    if argv is None:  # the command itself, about to exit
        _exit_without_finalizing(status)
    return status


def _dispatch(args: list[str]) -> int:
    try:
        if args[:1] == ["plugins"]:
            return _cmd_plugins(args[1:])
        if args[:1] == ["launcher"]:
            from vmmkit.launcher.cli import main as launcher_main

            return launcher_main(args[1:])
        if args[:1] == ["run"]:
            return _cmd_boot(args[1:], demo_default=True)
        return _cmd_boot(args, demo_default=False)
    except KeyboardInterrupt:
        return 130


def _exit_without_finalizing(status: int) -> None:
    """End the process with ``status`` now, as ``sys.exit`` would, minus the interpreter's
    finalization: freeing every module and object costs ~27 ms after the VM is gone, and the
    kernel releases memory and descriptors anyway (the VM and the API server are closed by
    then). What an exit must still do is done first: the ``atexit`` functions (the attrs code
    cache's save) and flushing stdout, stderr and the log. Returns, leaving the usual exit to
    the interpreter, when a non-daemon thread still runs (the interpreter would wait for it)
    or a flush fails (the interpreter reports it and exits with 120)."""
    import atexit
    import os

    threading = sys.modules.get("threading")
    if threading is not None and any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
                                     if thread is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr, _log_stream):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    os._exit(status)


# -- shared set-up ---------------------------------------------------------------------------


def _load_plugins(*, keep_broken: bool = False) -> tuple[Any, Any]:
    from vmmkit.launcher import prepared

    if not keep_broken and (plugins := prepared.plugins()) is not None:  # forked by the launcher
        return plugins
    from vmmkit.plugin import collect_registries, make_plugin_manager

    pm = make_plugin_manager(keep_broken=keep_broken)
    return pm, collect_registries(pm)


def _fail(message: str, status: int = EXIT_FAILURE) -> int:
    print(f"vmmkit: error: {message}", file=sys.stderr)
    return status


# -- vmmkit plugins --------------------------------------------------------------------------


def _cmd_plugins(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vmmkit plugins", description="List installed plugins.")
    parser.parse_args(args)
    from vmmkit.errors import VmmError
    from vmmkit.plugin import plugin_label

    try:
        pm, registries = _load_plugins(keep_broken=True)
    except VmmError as exc:
        return _fail(str(exc))
    out = sys.stdout
    for broken in pm.broken:
        print(f"vmmkit: warning: {broken.describe()}", file=sys.stderr)
    owners: dict[str, list[str]] = {}
    for registry in registries.all():
        for item in registry:
            owners.setdefault(registry.owner(item.name), []).append(f"{registry.kind} {item.name}")
    print("plugins:", file=out)
    for label in sorted(plugin_label(pm, plugin) for plugin in pm.get_plugins()):
        if label.startswith("vmmkit.hookspecs"):
            continue
        registered = owners.get(label, [])
        print(f"  {label}: {', '.join(registered) or 'hooks only'}", file=out)
    for broken in pm.broken:
        print(f"  {broken.distribution}: BROKEN, entry point {broken.name} = {broken.value}: {broken.error}",
              file=out)
    print("hypervisors (in --hypervisor auto order):", file=out)
    for backend in registries.hypervisor_order():
        availability = backend.is_available()
        if availability:
            state = f"usable ({availability.reason})" if availability.reason else "usable"
        else:
            state = f"not usable: {availability.reason}"
        arches = ",".join(backend.architectures) or "-"
        print(f"  {backend.name:<8} {state}  [guests: {arches}]  {backend.description}", file=out)
    print("architectures:", file=out)
    for arch in registries.architectures:
        print(f"  {arch.name:<8} {arch.description}", file=out)
    print("device types:", file=out)
    for device_type in registries.devices:
        option = f"  (--{device_type.option})" if device_type.option else ""
        support = device_type.host_support()
        here = "" if support is None else f"  [{'usable here' if support else 'not usable here'}: {support.reason}]"
        print(f"  {device_type.name:<18} {device_type.description}{option}{here}", file=out)
    print("transports (placing devices of a family):", file=out)
    for transport in registries.transports:
        alias = f" (or {transport.alias})" if transport.alias else ""
        print(f"  {transport.name + alias:<22} {transport.family:<9} {transport.description}  "
              f"[{registries.transports.owner(transport.name)}]", file=out)
    return 0


# -- booting a VM ----------------------------------------------------------------------------


def build_parser(pm: Any, registries: Any, prog: str = "vmmkit", *, lean: Any = None) -> argparse.ArgumentParser:
    """The VM-booting parser: Cloud Hypervisor's options plus what plugins add. ``lean``: the
    :class:`vmmkit.plugin_index.LeanPlugins` of a boot, whose deferred plugins' hypervisors and
    architectures are valid choices too."""
    from vmmkit.registry import AUTO
    from vmmkit.sandbox import cli as sandbox_cli

    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=_help_formatter(),
        description="Boot a virtual machine. Options follow Cloud Hypervisor's syntax.",
        epilog="Other commands: 'vmmkit plugins' lists plugins; 'vmmkit run' boots the demo guest.",
    )
    parser.add_argument("--version", action="version", version=f"vmmkit {__version__}")
    for flag, dest, repeatable, help_text in _VM_OPTIONS:
        parser.add_argument(flag, dest=dest, action="append" if repeatable else "store",
                            default=[] if repeatable else None, metavar="SPEC", help=help_text)
    parser.add_argument("--debug-console", dest="debug_console", metavar="SPEC",
                        help="port 0xe9 console: off|tty|file=<path>,iobase=<port>")
    parser.add_argument("--pvpanic", action="store_true", help="a pvpanic device: guest panics become events")
    parser.add_argument("--watchdog", action="store_true", help="a 6300ESB watchdog: resets a guest that hangs")
    for flag, _path, takes_value in _UNMODELLED_OPTIONS:
        dest = "unmodelled:" + flag
        if takes_value:
            parser.add_argument(flag, dest=dest, action="append", default=[], metavar="SPEC",
                                help="not supported yet")
        else:
            parser.add_argument(flag, dest=dest, action="store_true", help="not supported yet")
    hypervisors = lean.hypervisor_names() if lean is not None else [h.name for h in registries.hypervisor_order()]
    parser.add_argument("--hypervisor", default=AUTO, choices=[AUTO, *hypervisors],
                        help="backend (auto: the first usable one, see 'vmmkit plugins')")
    arches = lean.architecture_names() if lean is not None else registries.architectures.names()
    parser.add_argument("--arch", default=None, choices=arches,
                        help="guest architecture (default: the host's)")
    parser.add_argument("--api-socket", dest="api_socket", default=None, metavar="SPEC",
                        help="serve the management API on a Unix socket: path=<socket>|fd=<fd> "
                             "(without --kernel, wait for vm.create)")
    parser.add_argument("--restore", default=None, metavar="SPEC",
                        help="restore a snapshot: source_url=file:///<dir>,prefault=on|off,resume=on|off "
                             "(paused until vm.resume unless resume=on; the configuration is the snapshot's)")
    parser.add_argument("--event-monitor", dest="event_monitor", default=None, metavar="SPEC",
                        help="write lifecycle events as JSON: path=<file>|fd=<fd>")
    logging = parser.add_argument_group("logging")
    logging.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    logging.add_argument("--log-format", choices=("console", "json"), default=None,
                         help="log format (default: console on a terminal, json otherwise)")
    logging.add_argument("--log-file", default=None, help="write the log here instead of stderr")
    plugin_devices = parser.add_argument_group("plugin devices")
    for device_type in registries.devices:
        if device_type.option:
            plugin_devices.add_argument(
                f"--{device_type.option}", dest=f"plugin_device:{device_type.name}", action="append",
                default=[], metavar="SPEC", help=device_type.option_help or device_type.description,
            )
    sandbox_cli.add_options(parser)
    pm.hook.vmmkit_add_cli_options(parser=parser)
    return parser


def _help_formatter() -> Any:
    """argparse's help formatter with the terminal's width found once: argparse makes a
    formatter for every ``add_argument`` (to check its metavar), and one left to find its width
    asks the terminal each time, importing ``shutil`` for it: ~40 times on every boot, which
    prints no help. The width is found as ``shutil.get_terminal_size`` finds it: ``$COLUMNS``,
    else stdout's terminal, else 80."""
    import functools
    import os

    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return functools.partial(argparse.HelpFormatter, width=(columns or 80) - 2)


def config_from_options(options: argparse.Namespace, registries: Any) -> Any:
    """The ``VmConfig`` the parsed options describe (raises ``ConfigError``, and
    ``NotSupportedYet`` for an option vmmkit does not support yet)."""
    from vmmkit.config import NOT_SUPPORTED, DebugConsoleConfig, NotSupportedYet, PluginDeviceConfig, VmConfig

    for flag, path, _takes_value in _UNMODELLED_OPTIONS:
        given = getattr(options, "unmodelled:" + flag)
        if given:
            raise NotSupportedYet(flag, given, NOT_SUPPORTED[path])
    kwargs = {dest: getattr(options, dest) for _flag, dest, _rep, _help in _VM_OPTIONS}
    plugin_devices = []
    for device_type in registries.devices:
        if device_type.option:
            for spec in getattr(options, f"plugin_device:{device_type.name}"):
                option = f"--{device_type.option}"
                plugin_devices.append(PluginDeviceConfig.parse(device_type.name, spec, option=option))
    config = VmConfig.from_cli(**kwargs, plugin_devices=tuple(plugin_devices), pvpanic=options.pvpanic,
                               watchdog=options.watchdog, landlock_enable=options.landlock_enable,
                               landlock_rules=options.landlock_rules)
    if options.debug_console is not None:
        import attrs

        config = attrs.evolve(config, debug_console=DebugConsoleConfig.parse(options.debug_console))
    return config


def _cmd_boot(args: list[str], *, demo_default: bool) -> int:
    from vmmkit.config import ConfigError, NotSupportedYet
    from vmmkit.device import check_devices
    from vmmkit.errors import VmmError
    from vmmkit.plugin_index import lean_plugins

    try:
        pm, registries, lean = lean_plugins()  # without the on-demand plugins when an index is valid
    except VmmError as exc:
        return _fail(str(exc))
    parser = build_parser(pm, registries, prog="vmmkit run" if demo_default else "vmmkit", lean=lean)
    options = parser.parse_args(args)  # exits 2 on unknown options and bad choices
    if options.restore is not None:
        if lean is not None:
            try:
                lean.load_all()
            except VmmError as exc:
                return _fail(str(exc))
        return _cmd_restore(options, parser, pm, registries)
    try:
        config = config_from_options(options, registries)
        check_devices(config, registries.devices, cli=True)
    except NotSupportedYet as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        return _fail(str(exc), EXIT_USAGE)
    serving = options.api_socket is not None or options.event_monitor is not None
    if config.payload.kernel is None and options.api_socket is not None and not demo_default:
        config = None  # only the API: the VM comes with vm.create
    elif config.payload.kernel is None:
        if not demo_default:
            parser.error("--kernel is required (or use 'vmmkit run' to boot the bundled demo guest)")
        import attrs

        from vmmkit.demo import demo_kernel

        try:
            config = attrs.evolve(config, payload=attrs.evolve(config.payload, kernel=str(demo_kernel())))
        except VmmError as exc:
            return _fail(str(exc))
    try:
        configure_logging(options.verbose, options.log_format, options.log_file)
    except VmmError as exc:
        return _fail(str(exc), EXIT_USAGE)
    pm.hook.vmmkit_configure(options=options)
    if lean is not None:
        try:  # the API may create any VM; a boot needs what its hypervisor and architecture are
            lean.load_all() if serving else lean.load_for(options.hypervisor, options.arch)
        except VmmError as exc:
            return _fail(str(exc))
    if serving:
        return _serve(config, pm, registries, options)
    return _boot(config, pm, registries, options)


def _cmd_restore(options: argparse.Namespace, parser: argparse.ArgumentParser, pm: Any, registries: Any) -> int:
    """``--restore source_url=file:///dir[,prefault=on][,resume=on]``: the VM (configuration
    included) comes from the snapshot, so no VM option may be given with it; the VMM serves the
    API as with ``--api-socket`` and the restored VM waits, paused, for ``vm.resume``."""
    from vmmkit.config import ConfigError, OptionParser
    from vmmkit.errors import VmmError

    given = [flag for flag, dest, repeatable, _help in _VM_OPTIONS if getattr(options, dest) not in (None, [])]
    given += [flag for flag in ("--debug-console",) if options.debug_console is not None]
    given += [flag for flag, value in (("--pvpanic", options.pvpanic), ("--watchdog", options.watchdog)) if value]
    if given:
        return _fail(f"--restore: the configuration comes from the snapshot; {', '.join(given)} cannot be given "
                     "with it", EXIT_USAGE)
    try:
        spec = OptionParser("--restore", ("source_url", "prefault", "resume")).parse(options.restore)
        url = spec.get("source_url")
        if not url:
            raise ConfigError("--restore", options.restore, "source_url=file:///<directory>",
                              reason="source_url is required")
        prefault, resume = bool(spec.toggle("prefault")), bool(spec.toggle("resume"))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    if options.api_socket is None and not resume:
        return _fail("--restore: the restored VM is paused until vm.resume; give --api-socket to resume it "
                     "(or resume=on)", EXIT_USAGE)
    try:
        configure_logging(options.verbose, options.log_format, options.log_file)
    except VmmError as exc:
        return _fail(str(exc), EXIT_USAGE)
    pm.hook.vmmkit_configure(options=options)
    return _serve(None, pm, registries, options, restore=(url, prefault, resume))


def _boot(config: Any, pm: Any, registries: Any, options: argparse.Namespace) -> int:
    from vmmkit.config import ConfigError
    from vmmkit.errors import VmmError
    from vmmkit.machine import Machine, StopReason
    from vmmkit.sandbox import cli as sandbox_cli

    try:
        machine = Machine(config, registries=registries, plugin_manager=pm, hypervisor=options.hypervisor,
                          arch=options.arch, log_fd=_log_fd(options), seccomp=options.seccomp)
    except VmmError as exc:  # $VMMKIT_SECCOMP says nonsense
        return _fail(str(exc), EXIT_USAGE)
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        machine.request_stop(StopReason.REQUESTED, f"signal {signum}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        exit_ = machine.run(on_booted=sandbox_cli.confine_main_thread)
    except ConfigError as exc:  # a device's option only its device can check (a --pmem file)
        return _fail(str(exc), EXIT_USAGE)
    except VmmError as exc:
        return _fail(str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    if exit_.reason is StopReason.TRIPLE_FAULT:
        return _fail(f"the guest triple-faulted ({exit_.detail}); the VM was stopped")
    if exit_.reason is StopReason.INTERNAL_ERROR:
        return _fail(f"the VM stopped on an internal error: {exit_.detail}")
    return exit_.status


def _serve(config: Any, pm: Any, registries: Any, options: argparse.Namespace,
           restore: tuple[str, bool, bool] | None = None) -> int:
    """``--api-socket`` / ``--event-monitor``: a VMM that serves the API, boots ``config`` when
    there is one, and exits when the guest stops (or on ``vmm.shutdown``, with 0)."""
    from vmmkit.api.server import ApiServer
    from vmmkit.config import ConfigError
    from vmmkit.errors import VmmError
    from vmmkit.events import EventMonitor
    from vmmkit.machine import StopReason, activate_sandbox
    from vmmkit.sandbox import cli as sandbox_cli
    from vmmkit.sandbox import resolve_seccomp_mode
    from vmmkit.vmm import Vmm

    monitor = server = None
    try:
        # First, so that every thread the VMM starts (the event monitor's too) is confined.
        activate_sandbox(resolve_seccomp_mode(options.seccomp), pm)
        monitor = EventMonitor.open(options.event_monitor) if options.event_monitor else None
        vmm = Vmm(registries=registries, plugin_manager=pm, hypervisor=options.hypervisor,
                  arch=options.arch, log_fd=_log_fd(options), events=monitor, seccomp=options.seccomp)
        server = ApiServer.open(options.api_socket, vmm) if options.api_socket else None
    except ConfigError as exc:
        if monitor is not None:
            monitor.close()
        return _fail(str(exc), EXIT_USAGE)
    except VmmError as exc:  # the sandbox cannot be set up (no libseccomp)
        if monitor is not None:
            monitor.close()
        return _fail(str(exc))
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        vmm.request_exit(f"signal {signum}")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if restore is not None:
            vmm.expect_restore()  # requests that come before the VM wait for it
        if server is not None:
            server.start()
        if config is not None:
            vmm.create(config)
            vmm.boot()
        if restore is not None:
            url, prefault, resume = restore
            try:
                vmm.restore(url, prefault=prefault, resume=resume)
            finally:
                vmm.restore_ended()
        sandbox_cli.confine_main_thread()
        exit_ = vmm.wait()
    except ConfigError as exc:  # a device's option only its device can check (a --pmem file)
        return _fail(str(exc), EXIT_USAGE)
    except VmmError as exc:
        return _fail(str(exc))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.close()
        vmm.close()
        if monitor is not None:
            monitor.close()
    if received:
        return 128 + received[0]
    if exit_ is None:
        return 0
    if exit_.reason is StopReason.TRIPLE_FAULT:
        return _fail(f"the guest triple-faulted ({exit_.detail}); the VM was stopped")
    if exit_.reason is StopReason.INTERNAL_ERROR:
        return _fail(f"the VM stopped on an internal error: {exit_.detail}")
    return exit_.status


def _log_fd(options: argparse.Namespace) -> int | None:
    """The log's fd for natively written log lines, when info-level logging is on."""
    from vmmkit import log

    return log.native_fd(log.INFO)


# -- logging (configured here and nowhere else) ----------------------------------------------


def configure_logging(verbosity: int, fmt: str | None, log_file: str | None) -> None:
    """Choose the level and output (stderr, or ``--log-file``; never stdout); structlog itself
    is configured (and imported) only when the first message at an enabled level is logged
    (see :mod:`vmmkit.log`). Raises ``VmmError`` for a log file that cannot be opened."""
    from vmmkit import log

    global _log_stream
    stream: TextIO = log.open_log_file(log_file) if log_file else sys.stderr
    _log_stream = stream
    log.setup(verbosity, fmt, stream)


if __name__ == "__main__":
    sys.exit(main())
