"""The pre-forked launcher: a resident ``vmmkit launcher serve`` process keeps an interpreter
with vmmkit, its plugins and their native modules imported, and forks one VMM process per
``vmmkit`` command, which then starts in a few milliseconds instead of paying for Python's
imports. ``vmmkit`` uses a running server by itself (:mod:`vmmkit.launcher.client`) and starts
cold when there is none, or with ``VMMKIT_LAUNCHER=off``.

- :mod:`vmmkit.launcher.client`: the command's side, built-in modules only (it runs on the
  cold path of every command).
- :mod:`vmmkit.launcher.server`: the server, the per-launch monitor and the VMM process set-up.
- :mod:`vmmkit.launcher.cli`: ``vmmkit launcher serve|stop|status``.
"""
