"""A small AML (ACPI Machine Language) builder, enough for a DSDT that describes devices.

Objects mirror the ASL they stand for and turn into bytes with :func:`encode` (ACPI 6.5,
chapter 20)::

    Scope("\\_SB_", [
        Device("COM1", [
            Name("_HID", EisaId("PNP0501")),
            Name("_UID", 1),
            Name("_CRS", ResourceTemplate([Io(0x3F8, 0x3F8, 1, 8), IrqNoFlags(4)])),
        ]),
    ])

Plain Python values are data objects: ``int`` an Integer (the shortest encoding), ``str`` a
String, ``bytes`` a Buffer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeAlias

from vmmkit.value import Value

# -- opcodes ----------------------------------------------------------------------------------
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
RETURN_OP = 0xA4


class AmlObject(Value):
    """Base of the AML objects: ``to_aml()``, and equality and a repr from ``__slots__``.
    :func:`encode` also takes any other object with a ``to_aml()``."""

    __slots__: tuple[str, ...] = ()

    def to_aml(self) -> bytes:
        raise NotImplementedError


Term: TypeAlias = "AmlObject | int | str | bytes"


def _numbers(values: int | Iterable[int]) -> tuple[int, ...]:
    return (values,) if isinstance(values, int) else tuple(values)


def encode(term: Term) -> bytes:
    """The AML bytes of a term (an :class:`AmlObject` or a plain data value)."""
    if isinstance(term, AmlObject):
        return term.to_aml()
    if isinstance(term, bool):
        raise TypeError("AML has no booleans: use 0 or 1")
    if isinstance(term, int):
        return integer(term)
    if isinstance(term, str):
        return string(term)
    if isinstance(term, bytes):
        return Buffer(term).to_aml()
    to_aml = getattr(term, "to_aml", None)
    if callable(to_aml):
        return bytes(to_aml())
    raise TypeError(f"not an AML term: {term!r}")


def encode_all(terms: Iterable[Term]) -> bytes:
    return b"".join([encode(t) for t in terms])


def integer(value: int) -> bytes:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integers are unsigned 64-bit: {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable")


def string(text: str) -> bytes:
    data = text.encode("ascii")
    if b"\0" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\0"


_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LEAD_CHARS = frozenset(_UPPER + "_")
_NAME_CHARS = frozenset(_UPPER + "_0123456789")


def _is_segment(segment: str) -> bool:
    """A NameSeg of 1-4 characters: ``[A-Z_][A-Z0-9_]{0,3}``."""
    return 0 < len(segment) <= 4 and segment[0] in _LEAD_CHARS and _NAME_CHARS.issuperset(segment)


def name_string(path: str) -> bytes:
    """Encode a name path: ``_HID``, ``\\_SB_.PCI0``, ``^COM1`` (segments padded with ``_``)."""
    if len(path) == 4 and _is_segment(path):  # the common case: one whole segment
        return path.encode("ascii")
    out = bytearray()
    rest = path
    if rest.startswith("\\"):
        out.append(ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            out.append(PARENT_PREFIX_CHAR)
            rest = rest[1:]
    segments = rest.split(".") if rest else []
    for segment in segments:
        if not _is_segment(segment):
            raise ValueError(f"invalid AML name segment {segment!r} in {path!r}")
    encoded = [s.ljust(4, "_").encode("ascii") for s in segments]
    if not encoded:
        out.append(ZERO_OP)  # NullName
    elif len(encoded) == 1:
        out += encoded[0]
    elif len(encoded) == 2:
        out.append(DUAL_NAME_PREFIX)
        out += encoded[0] + encoded[1]
    else:
        if len(encoded) > 255:
            raise ValueError(f"name path too long: {path!r}")
        out += bytes([MULTI_NAME_PREFIX, len(encoded)])
        out += b"".join(encoded)
    return bytes(out)


def pkg_length(body_length: int) -> bytes:
    """The PkgLength encoding for a package whose contents (after PkgLength) are
    ``body_length`` bytes; the encoded length counts the PkgLength bytes too."""
    if body_length + 1 < 0x40:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package too large: {body_length} bytes")


def _package(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


_HEX_UPPER = frozenset("0123456789ABCDEF")


def eisa_id(text: str) -> int:
    """The compressed EISA ID of ``"PNP0501"``-style text (ASL's ``EISAID()``)."""
    if not (len(text) == 7 and all(c in _UPPER for c in text[:3]) and _HEX_UPPER.issuperset(text[3:])):
        raise ValueError(f"not an EISA ID: {text!r}")
    c1, c2, c3 = (ord(c) - 0x40 for c in text[:3])
    product = int(text[3:], 16)
    raw = bytes([(c1 << 2) | (c2 >> 3), ((c2 & 7) << 5) | c3, product >> 8, product & 0xFF])
    return int.from_bytes(raw, "little")


# -- named objects and control ----------------------------------------------------------------


class EisaId(AmlObject):
    """``EISAID("PNP0501")``: an Integer holding the compressed ID."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def to_aml(self) -> bytes:
        return integer(eisa_id(self.text))


class Path(AmlObject):
    """A reference to a named object (a NameString used as a term)."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def to_aml(self) -> bytes:
        return name_string(self.path)


class Name(AmlObject):
    """``Name(path, value)``."""

    __slots__ = ("path", "value")

    def __init__(self, path: str, value: Term) -> None:
        self.path = path
        self.value = value

    def to_aml(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.path) + encode(self.value)


class Scope(AmlObject):
    """``Scope(path) { children }``."""

    __slots__ = ("path", "children")

    def __init__(self, path: str, children: Iterable[Term] = ()) -> None:
        self.path = path
        self.children: Sequence[Term] = tuple(children)

    def to_aml(self) -> bytes:
        return _package(bytes([SCOPE_OP]), name_string(self.path) + encode_all(self.children))


class Device(AmlObject):
    """``Device(path) { children }``."""

    __slots__ = ("path", "children")

    def __init__(self, path: str, children: Iterable[Term] = ()) -> None:
        self.path = path
        self.children: Sequence[Term] = tuple(children)

    def to_aml(self) -> bytes:
        body = name_string(self.path) + encode_all(self.children)
        return _package(bytes([EXT_OP_PREFIX, DEVICE_OP]), body)


class Method(AmlObject):
    """``Method(path, args, Serialized|NotSerialized) { body }``."""

    __slots__ = ("path", "args", "body", "serialized")

    def __init__(self, path: str, args: int = 0, body: Iterable[Term] = (), serialized: bool = False) -> None:
        self.path = path
        self.args = args
        self.body: Sequence[Term] = tuple(body)
        self.serialized = serialized

    def to_aml(self) -> bytes:
        if not 0 <= self.args <= 7:
            raise ValueError("an AML method takes 0 to 7 arguments")
        flags = self.args | (0x08 if self.serialized else 0)
        body = name_string(self.path) + bytes([flags]) + encode_all(self.body)
        return _package(bytes([METHOD_OP]), body)


class Return(AmlObject):
    __slots__ = ("value",)

    def __init__(self, value: Term) -> None:
        self.value = value

    def to_aml(self) -> bytes:
        return bytes([RETURN_OP]) + encode(self.value)


class Package(AmlObject):
    """``Package() { elements }`` (at most 255 elements)."""

    __slots__ = ("elements",)

    def __init__(self, elements: Iterable[Term] = ()) -> None:
        self.elements: Sequence[Term] = tuple(elements)

    def to_aml(self) -> bytes:
        if len(self.elements) > 255:
            raise ValueError("a Package holds at most 255 elements (use VarPackage)")
        body = bytes([len(self.elements)]) + encode_all(self.elements)
        return _package(bytes([PACKAGE_OP]), body)


class Buffer(AmlObject):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def to_aml(self) -> bytes:
        body = integer(len(self.data)) + self.data
        return _package(bytes([BUFFER_OP]), body)


# -- operation regions and method bodies (enough for the GED's _EVT) -------------------------

SYSTEM_MEMORY = 0x00  #: OperationRegion space
SYSTEM_IO = 0x01
BYTE_ACC = 0x01  #: Field access type
WRITE_AS_ZEROS = 0x40  #: Field update rule (bits 5-6 = 2)


class OpRegion(AmlObject):
    """``OperationRegion(name, space, offset, length)``."""

    __slots__ = ("path", "space", "offset", "length")

    def __init__(self, path: str, space: int, offset: int, length: int) -> None:
        self.path = path
        self.space = space
        self.offset = offset
        self.length = length

    def to_aml(self) -> bytes:
        return (
            bytes([EXT_OP_PREFIX, 0x80])
            + name_string(self.path)
            + bytes([self.space])
            + integer(self.offset)
            + integer(self.length)
        )


class Field(AmlObject):
    """``Field(region, ByteAcc, NoLock, WriteAsZeros) { name, bits, ... }``; an entry named
    ``""`` is reserved space (``Offset``), skipping its bits."""

    __slots__ = ("region", "fields", "flags")

    def __init__(self, region: str, fields: Sequence[tuple[str, int]], flags: int = BYTE_ACC | WRITE_AS_ZEROS) -> None:
        self.region = region
        self.fields = fields
        self.flags = flags

    def to_aml(self) -> bytes:
        body = name_string(self.region) + bytes([self.flags])
        for name, bits in self.fields:
            if name == "":  # a ReservedField: skips ``bits`` (CH's ``FieldEntry::Reserved``)
                body += b"\x00" + _field_width(bits)
                continue
            if len(name) != 4 or not _is_segment(name):
                raise ValueError(f"a field name is one 4-character segment, not {name!r}")
            body += name.encode("ascii") + _field_width(bits)
        return _package(bytes([EXT_OP_PREFIX, 0x81]), body)


def _field_width(bits: int) -> bytes:
    """A field's width in bits, in PkgLength form (the value itself, not counting its bytes)."""
    if not 0 < bits < 1 << 28:
        raise ValueError(f"field width out of range: {bits}")
    if bits < 0x40:
        return bytes([bits])
    extra = 1 if bits < 1 << 12 else 2 if bits < 1 << 20 else 3
    return bytes([(extra << 6) | (bits & 0x0F)]) + (bits >> 4).to_bytes(extra, "little")


class Local(AmlObject):
    """``LocalN`` (N = 0-7)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def to_aml(self) -> bytes:
        if not 0 <= self.index <= 7:
            raise ValueError("AML has Local0 to Local7")
        return bytes([0x60 + self.index])


class Store(AmlObject):
    """``Store(source, target)``."""

    __slots__ = ("source", "target")

    def __init__(self, source: Term, target: Term) -> None:
        self.source = source
        self.target = target

    def to_aml(self) -> bytes:
        return bytes([0x70]) + encode(self.source) + encode(self.target)


class And(AmlObject):
    """``And(left, right, target)``."""

    __slots__ = ("left", "right", "target")

    def __init__(self, left: Term, right: Term, target: Term) -> None:
        self.left = left
        self.right = right
        self.target = target

    def to_aml(self) -> bytes:
        return bytes([0x7B]) + encode(self.left) + encode(self.right) + encode(self.target)


class LEqual(AmlObject):
    """``LEqual(left, right)``."""

    __slots__ = ("left", "right")

    def __init__(self, left: Term, right: Term) -> None:
        self.left = left
        self.right = right

    def to_aml(self) -> bytes:
        return bytes([0x93]) + encode(self.left) + encode(self.right)


class If(AmlObject):
    """``If (predicate) { body }``."""

    __slots__ = ("predicate", "body")

    def __init__(self, predicate: Term, body: Iterable[Term] = ()) -> None:
        self.predicate = predicate
        self.body: Sequence[Term] = tuple(body)

    def to_aml(self) -> bytes:
        return _package(bytes([0xA0]), encode(self.predicate) + encode_all(self.body))


class Notify(AmlObject):
    """``Notify(object, value)``."""

    __slots__ = ("target", "value")

    def __init__(self, target: Term, value: Term) -> None:
        self.target = target
        self.value = value

    def to_aml(self) -> bytes:
        return bytes([0x86]) + encode(self.target) + encode(self.value)


# -- resource descriptors (ACPI 6.5, 6.4) -----------------------------------------------------


class Io(AmlObject):
    """``IO(Decode16, min, max, alignment, length)``."""

    __slots__ = ("minimum", "maximum", "alignment", "length")

    def __init__(self, minimum: int, maximum: int, alignment: int, length: int) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.alignment = alignment
        self.length = length

    def to_aml(self) -> bytes:
        return (
            bytes([0x47, 0x01])
            + self.minimum.to_bytes(2, "little")
            + self.maximum.to_bytes(2, "little")
            + bytes([self.alignment, self.length])
        )


class IrqNoFlags(AmlObject):
    """``IRQNoFlags() {irqs}``: ISA interrupts, edge-triggered, active high, exclusive."""

    __slots__ = ("irqs",)

    def __init__(self, irqs: int | Iterable[int]) -> None:
        self.irqs: Sequence[int] = _numbers(irqs)

    def to_aml(self) -> bytes:
        mask = 0
        for irq in self.irqs:
            if not 0 <= irq <= 15:
                raise ValueError(f"IRQNoFlags takes IRQs 0-15, not {irq}")
            mask |= 1 << irq
        return bytes([0x22]) + mask.to_bytes(2, "little")


class Interrupt(AmlObject):
    """``Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsis}``."""

    __slots__ = ("interrupts", "consumer", "edge", "active_low", "shared")

    def __init__(
        self,
        interrupts: int | Iterable[int],
        consumer: bool = True,
        edge: bool = True,
        active_low: bool = False,
        shared: bool = False,
    ) -> None:
        self.interrupts: Sequence[int] = _numbers(interrupts)
        self.consumer = consumer
        self.edge = edge
        self.active_low = active_low
        self.shared = shared

    def to_aml(self) -> bytes:
        flags = (self.consumer << 0) | (self.edge << 1) | (self.active_low << 2) | (self.shared << 3)
        body = bytes([flags, len(self.interrupts)]) + b"".join(
            i.to_bytes(4, "little") for i in self.interrupts
        )
        return bytes([0x89]) + len(body).to_bytes(2, "little") + body


class Memory32Fixed(AmlObject):
    """``Memory32Fixed(ReadWrite|ReadOnly, base, length)``."""

    __slots__ = ("base", "length", "writeable")

    def __init__(self, base: int, length: int, writeable: bool = True) -> None:
        self.base = base
        self.length = length
        self.writeable = writeable

    def to_aml(self) -> bytes:
        body = (
            bytes([int(self.writeable)]) + self.base.to_bytes(4, "little") + self.length.to_bytes(4, "little")
        )
        return bytes([0x86]) + len(body).to_bytes(2, "little") + body


# Address space resource types and flags.
MEMORY_RANGE = 0
IO_RANGE = 1
BUS_NUMBER_RANGE = 2
_MIN_FIXED = 1 << 2
_MAX_FIXED = 1 << 3
_CONSUMER = 1 << 0


class AddressSpace(AmlObject):
    """``WordBusNumber`` / ``WordIO`` / ``DWordMemory`` / ``QWordMemory`` (by ``width``):
    a fixed-size ``[minimum, maximum]`` range a bridge produces (or a device consumes).

    ``type_flags``: for memory, bit 0 read-write and bits 1-2 cacheability; for I/O, bits 0-1
    the range (3: entire).
    """

    __slots__ = ("resource_type", "minimum", "maximum", "width", "type_flags", "consumer", "translation")

    _TAGS = {2: 0x88, 4: 0x87, 8: 0x8A}

    def __init__(
        self,
        resource_type: int,
        minimum: int,
        maximum: int,
        width: int = 8,
        type_flags: int = 0,
        consumer: bool = False,
        translation: int = 0,
    ) -> None:
        self.resource_type = resource_type
        self.minimum = minimum
        self.maximum = maximum
        self.width = width  #: 2 (Word), 4 (DWord) or 8 (QWord) bytes per field
        self.type_flags = type_flags
        self.consumer = consumer
        self.translation = translation

    def to_aml(self) -> bytes:
        if self.width not in self._TAGS:
            raise ValueError("address space descriptors are 2, 4 or 8 bytes wide")
        length = self.maximum - self.minimum + 1
        limit = 1 << (8 * self.width)
        if not (0 <= self.minimum <= self.maximum < limit and length < limit):
            raise ValueError(f"range {self.minimum:#x}-{self.maximum:#x} does not fit {self.width} bytes")
        general = _MIN_FIXED | _MAX_FIXED | (_CONSUMER if self.consumer else 0)
        fields = (0, self.minimum, self.maximum, self.translation, length)
        body = bytes([self.resource_type, general, self.type_flags]) + b"".join(
            v.to_bytes(self.width, "little") for v in fields
        )
        return bytes([self._TAGS[self.width]]) + len(body).to_bytes(2, "little") + body


def word_bus_number(first: int, last: int) -> AddressSpace:
    return AddressSpace(BUS_NUMBER_RANGE, first, last, width=2)


def word_io(first: int, last: int) -> AddressSpace:
    return AddressSpace(IO_RANGE, first, last, width=2, type_flags=0x03)


def dword_memory(first: int, last: int, *, cacheable: bool = False) -> AddressSpace:
    return AddressSpace(MEMORY_RANGE, first, last, width=4, type_flags=0x01 | (0x02 if cacheable else 0))


def qword_memory(first: int, last: int, *, cacheable: bool = False) -> AddressSpace:
    return AddressSpace(MEMORY_RANGE, first, last, width=8, type_flags=0x01 | (0x02 if cacheable else 0))


class ResourceTemplate(AmlObject):
    """``ResourceTemplate() { descriptors }``: a Buffer ending in an End Tag."""

    __slots__ = ("descriptors",)

    def __init__(self, descriptors: Iterable[AmlObject] = ()) -> None:
        self.descriptors: Sequence[AmlObject] = tuple(descriptors)

    def to_aml(self) -> bytes:
        data = b"".join([d.to_aml() for d in self.descriptors]) + bytes([0x79, 0x00])
        return Buffer(data).to_aml()


# -- device nodes -----------------------------------------------------------------------------

#: ``_STA``: present, enabled, shown in UI, functioning.
STA_PRESENT = 0x0F


def simple_device(name: str, hid: Term, uid: int, resources: Sequence[AmlObject], *extra: Term) -> Device:
    """``Device(name) { _HID, *extra, _UID, _STA (present), _CRS }``: how most devices
    describe themselves."""
    return Device(
        name,
        [
            Name("_HID", hid),
            *extra,
            Name("_UID", uid),
            Name("_STA", STA_PRESENT),
            Name("_CRS", ResourceTemplate(resources)),
        ],
    )


def legacy_irq(irq: int | None) -> list[AmlObject]:
    """The resource of a device's interrupt line: ``IRQNoFlags`` for an ISA line (below 16),
    else an extended ``Interrupt`` (level, active high); nothing for ``None``."""
    if irq is None:
        return []
    return [IrqNoFlags(irq)] if irq < 16 else [Interrupt(irq)]


def io_ports(placement: tuple[int, int] | None) -> list[AmlObject]:
    """An ``IO`` resource for a fixed ``(base, size)`` port range; nothing for ``None``."""
    if placement is None:
        return []
    base, size = placement
    return [Io(base, base, 1, size)]


# -- more method bodies (PCI hotplug: Cloud Hypervisor's PHPR and PCI slot methods) ------------

DWORD_ACC = 0x03  #: Field access type


class Arg(AmlObject):
    """``ArgN`` (N = 0-6)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def to_aml(self) -> bytes:
        if not 0 <= self.index <= 6:
            raise ValueError("AML has Arg0 to Arg6")
        return bytes([0x68 + self.index])


class Call(AmlObject):
    """A method invocation: ``Path(args...)`` (the callee must take exactly ``len(args)``)."""

    __slots__ = ("path", "args")

    def __init__(self, path: str, args: Iterable[Term] = ()) -> None:
        self.path = path
        self.args: Sequence[Term] = tuple(args)

    def to_aml(self) -> bytes:
        return name_string(self.path) + encode_all(self.args)


class ShiftLeft(AmlObject):
    """``ShiftLeft(source, count, target)``."""

    __slots__ = ("source", "count", "target")

    def __init__(self, source: Term, count: Term, target: Term) -> None:
        self.source = source
        self.count = count
        self.target = target

    def to_aml(self) -> bytes:
        return bytes([0x79]) + encode(self.source) + encode(self.count) + encode(self.target)


class Mutex(AmlObject):
    """``Mutex(name, sync_level)``."""

    __slots__ = ("path", "sync_level")

    def __init__(self, path: str, sync_level: int = 0) -> None:
        self.path = path
        self.sync_level = sync_level

    def to_aml(self) -> bytes:
        if not 0 <= self.sync_level <= 15:
            raise ValueError("a mutex's sync level is 0-15")
        return bytes([EXT_OP_PREFIX, 0x01]) + name_string(self.path) + bytes([self.sync_level])


class Acquire(AmlObject):
    """``Acquire(mutex, timeout)`` (0xFFFF: wait for ever)."""

    __slots__ = ("path", "timeout")

    def __init__(self, path: str, timeout: int = 0xFFFF) -> None:
        self.path = path
        self.timeout = timeout

    def to_aml(self) -> bytes:
        return bytes([EXT_OP_PREFIX, 0x23]) + name_string(self.path) + self.timeout.to_bytes(2, "little")


class Release(AmlObject):
    """``Release(mutex)``."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

    def to_aml(self) -> bytes:
        return bytes([EXT_OP_PREFIX, 0x27]) + name_string(self.path)


# -- arithmetic, loops and buffer fields (CPU and memory hotplug: CH's CSCN, MSCN) ------


class _Binary(AmlObject):
    """``Op(left, right, target)``: an arithmetic or bitwise operator with a target."""

    __slots__ = ("left", "right", "target")
    opcode: int = 0

    def __init__(self, left: Term, right: Term, target: Term) -> None:
        self.left = left
        self.right = right
        self.target = target

    def to_aml(self) -> bytes:
        return bytes([self.opcode]) + encode(self.left) + encode(self.right) + encode(self.target)


class Add(_Binary):
    """``Add(left, right, target)``."""

    opcode = 0x72


class Subtract(_Binary):
    """``Subtract(left, right, target)``."""

    opcode = 0x74


class Or(_Binary):
    """``Or(left, right, target)``."""

    opcode = 0x7D


class LLess(AmlObject):
    """``LLess(left, right)``."""

    __slots__ = ("left", "right")

    def __init__(self, left: Term, right: Term) -> None:
        self.left = left
        self.right = right

    def to_aml(self) -> bytes:
        return bytes([0x95]) + encode(self.left) + encode(self.right)


class While(AmlObject):
    """``While (predicate) { body }``."""

    __slots__ = ("predicate", "body")

    def __init__(self, predicate: Term, body: Iterable[Term] = ()) -> None:
        self.predicate = predicate
        self.body: Sequence[Term] = tuple(body)

    def to_aml(self) -> bytes:
        return _package(bytes([0xA2]), encode(self.predicate) + encode_all(self.body))


class CreateQWordField(AmlObject):
    """``CreateQWordField(buffer, byte_index, name)``: a name for 8 bytes of a buffer."""

    __slots__ = ("buffer", "index", "path")

    def __init__(self, buffer: Term, index: int, path: str) -> None:
        self.buffer = buffer
        self.index = index
        self.path = path

    def to_aml(self) -> bytes:
        return bytes([0x8F]) + encode(self.buffer) + integer(self.index) + name_string(self.path)
