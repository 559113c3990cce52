"""A base for small immutable value types (an AML object, and the x86-64 plugin's memory-map
entries and CPUID bits).

Equality, hashing and a repr come from ``__slots__`` (the fields, in order). They are plain
classes rather than attrs classes because defining one costs ~0.02 ms instead of ~0.3 ms, and
every boot defines them all; treat them as immutable.
"""

from __future__ import annotations


class Value:
    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Value)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"
