#!/usr/bin/env python3
"""Package the selftest kernel as a Linux bzImage.

usage: mkbzimage.py SETUP.bin PAYLOAD.bin KERNEL.elf OUT.bzImage

SETUP.bin is the assembled real-mode part (setup.S); PAYLOAD.bin is
"objcopy -O binary" of KERNEL.elf, whose program headers give init_size.
The result is SETUP.bin with syssize and init_size filled in, followed by
the payload padded to 16 bytes.
"""
import struct
import sys

LOAD = 0x100000
PT_LOAD = 1


def elf_extent(path):
    """(lowest load address, end of memory image, entry point) of an ELF64."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        sys.exit(f"{path}: not an ELF64 file")
    entry, phoff = struct.unpack_from("<QQ", data, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    lo, hi = None, 0
    for i in range(phnum):
        p_type, _, _, _, paddr, _, memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == PT_LOAD and memsz:
            lo = paddr if lo is None else min(lo, paddr)
            hi = max(hi, paddr + memsz)
    return lo, hi, entry


def main(setup_path, payload_path, elf_path, out_path):
    setup = bytearray(open(setup_path, "rb").read())
    payload = open(payload_path, "rb").read()
    lo, hi, entry = elf_extent(elf_path)

    sects = setup[0x1F1]
    checks = [
        (len(setup) == (sects + 1) * 512, "setup size != (setup_sects + 1) * 512"),
        (setup[0x1FE:0x200] == b"\x55\xaa", "no boot_flag 0xAA55"),
        (setup[0x202:0x206] == b"HdrS", "no HdrS"),
        (struct.unpack_from("<I", setup, 0x214)[0] == lo == LOAD, "code32_start != load address"),
        (entry == LOAD + 0x200, "ELF entry is not load address + 0x200"),
    ]
    for ok, what in checks:
        if not ok:
            sys.exit(f"mkbzimage: {what}")

    payload += b"\0" * (-len(payload) % 16)
    init_size = (hi - lo + 0xFFF) & ~0xFFF
    struct.pack_into("<I", setup, 0x1F4, len(payload) // 16)  # syssize
    struct.pack_into("<I", setup, 0x260, init_size)            # init_size
    with open(out_path, "wb") as f:
        f.write(setup + payload)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
