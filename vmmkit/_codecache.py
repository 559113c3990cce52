"""A disk cache for the methods attrs generates, to keep start-up lean.

attrs writes ``__init__``, ``__eq__``, ``__hash__``... of every class as source and compiles it
at import time; for vmmkit's few hundred generated methods that compile step is the largest
single cost of starting a VM. This module wraps attrs' compile helper with a cache of code
objects keyed by a hash of the exact source (so a changed class can never get stale code),
kept in ``$XDG_CACHE_HOME/vmmkit`` and written atomically at exit when it grew. The one part of
the source that changes between processes, the per-class salt attrs puts into ``__hash__``
(``hash(<class name>)``, randomised per process), is left out of the key: a cached ``__hash__``
keeps the salt of the run that compiled it, which is as good a salt.
Like Python's own bytecode cache it is not written under ``PYTHONDONTWRITEBYTECODE``;
``VMMKIT_NO_CODE_CACHE=1`` turns it off. If attrs' internals change, it does nothing.
"""

from __future__ import annotations

import atexit
import marshal
import os
import re
import sys
from types import CodeType
from typing import Any

_cache: dict[bytes, CodeType] = {}
_HASH_SALT = re.compile(r"hash\(\(\s*-?\d+,")
_dirty = False


def _cache_file(attrs_make_file: str) -> str:
    """One cache per interpreter and attrs installation. The installation is told apart by its
    code generator's file (``attr.__version__`` would import ``importlib.metadata``: ~25 ms)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    stat = os.stat(attrs_make_file)
    tag = f"{sys.implementation.cache_tag}-attrs-{stat.st_size}-{stat.st_mtime_ns}"
    return os.path.join(base, "vmmkit", f"attrs-code-{tag}.marshal")


def install() -> None:
    if os.environ.get("VMMKIT_NO_CODE_CACHE"):
        return
    try:
        from attr import _make
    except ImportError:
        return
    from _blake2 import blake2b  # hashlib would load OpenSSL: a few ms of start-up for nothing

    original = getattr(_make, "_compile_and_eval", None)
    if original is None or getattr(original, "_vmmkit_cached", False):
        return
    try:
        path = _cache_file(_make.__file__)
    except (OSError, TypeError):
        return
    try:
        with open(path, "rb") as stream:
            loaded = marshal.loads(stream.read())
        if isinstance(loaded, dict):
            _cache.update(loaded)
    except (OSError, EOFError, ValueError, TypeError):
        pass

    def compile_and_eval(script: str, globs: Any, locs: Any = None, filename: str = "") -> None:
        global _dirty
        stable = _HASH_SALT.sub("hash((salt,", script)
        key = blake2b(f"{filename}\0{stable}".encode(), digest_size=16).digest()
        code = _cache.get(key)
        if code is None:
            code = _cache[key] = compile(script, filename, "exec")
            _dirty = True
        eval(code, globs, locs)

    compile_and_eval._vmmkit_cached = True  # type: ignore[attr-defined]
    _make._compile_and_eval = compile_and_eval
    atexit.register(_save, path)


def _save(path: str) -> None:
    if not _dirty or sys.dont_write_bytecode:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "wb") as stream:
            stream.write(marshal.dumps(_cache))
        os.replace(temporary, path)
    except OSError:
        pass
