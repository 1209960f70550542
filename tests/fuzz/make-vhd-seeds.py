#!/usr/bin/env python3
"""Remakes the VHD fuzz seeds (seeds-vhd/) and the parent fixture (fixtures/parent.vhd).

Small hand-made VHDs with 4 KiB blocks, so each seed is a few KiB: fixed, dynamic (sector bitmaps
partly set), differencing on fixtures/parent.vhd (W2ru and W2ku locators) and on fixtures/b.raw,
plus qemu-img's own empty fixed and dynamic disks. Run from the repository root."""
import os
import struct
import subprocess
import tempfile

FUZZ = os.path.join("tests", "fuzz")
SEEDS = os.path.join(FUZZ, "seeds-vhd")


def checksum(b, field):
    b = bytearray(b)
    b[field:field + 4] = b"\0\0\0\0"
    return (~sum(b)) & 0xFFFFFFFF


def footer(size, disk_type, data_offset, uuid):
    f = bytearray(512)
    f[0:8] = b"conectix"
    struct.pack_into(">IIQI4sI4sQQHBBI", f, 8, 2, 0x10000, data_offset, 0, b"kiln",
                     0x10000, b"Wi2k", size, size, 65535, 16, 255, disk_type)
    f[68:84] = uuid
    struct.pack_into(">I", f, 64, checksum(f, 64))
    return bytes(f)


def dynamic(size, disk_type, uuid, blocks, parent=None, locators=()):
    """blocks: {index: (bitmap byte, data byte)}; locators: [(platform, name)]."""
    bs = 4096
    entries = (size + bs - 1) // bs
    bat_at = 1536
    data_at = bat_at + ((entries * 4 + 511) // 512) * 512
    body = bytearray()
    bat = [0xFFFFFFFF] * entries
    for i, (bits, fill) in sorted(blocks.items()):
        bat[i] = (data_at + len(body)) // 512
        body += bytes([bits]) + bytes(511) + bytes([fill]) * bs
    locs = bytearray()
    loc_entries = []
    for platform, name in locators:
        raw = name.encode("utf-16-le")
        loc_entries.append((platform, len(raw), data_at + len(body) + len(locs)))
        locs += raw + bytes((-len(raw)) % 512)
    h = bytearray(1024)
    h[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", h, 8, 0xFFFFFFFFFFFFFFFF, bat_at, 0x10000, entries, bs)
    if parent:
        h[40:56] = parent
    for k, (platform, length, at) in enumerate(loc_entries):
        struct.pack_into(">4sIIIQ", h, 576 + 24 * k, platform, 1, length, 0, at)
    struct.pack_into(">I", h, 36, checksum(h, 36))
    f = footer(size, disk_type, 512, uuid)
    table = b"".join(struct.pack(">I", e) for e in bat)
    table += b"\xff" * ((-len(table)) % 512)
    return f + bytes(h) + table + bytes(body) + bytes(locs) + f


def write(path, data):
    with open(path, "wb") as out:
        out.write(data)


def main():
    os.makedirs(SEEDS, exist_ok=True)
    puuid = bytes(range(16))
    parent = dynamic(16384, 3, puuid, {0: (0xFF, 0x11), 2: (0xF0, 0x12)})
    write(os.path.join(FUZZ, "fixtures", "parent.vhd"), parent)
    write(os.path.join(SEEDS, "dynamic.vhd"), dynamic(16384, 3, bytes(16), {1: (0xAA, 0x21), 3: (0xFF, 0x22)}))
    write(os.path.join(SEEDS, "fixed.vhd"), bytes([0x31]) * 4096 + bytes(4096) + footer(8192, 2, 0xFFFFFFFFFFFFFFFF, bytes(16)))
    write(os.path.join(SEEDS, "diff-w2ru.vhd"),
          dynamic(16384, 4, bytes([1] * 16), {0: (0x0F, 0x41)}, puuid, [(b"W2ru", ".\\parent.vhd")]))
    write(os.path.join(SEEDS, "diff-w2ku.vhd"),
          dynamic(16384, 4, bytes([2] * 16), {1: (0x80, 0x42)}, puuid, [(b"W2ku", "C:\\vms\\parent.vhd")]))
    write(os.path.join(SEEDS, "diff-raw.vhd"),
          dynamic(16384, 4, bytes([3] * 16), {2: (0x3C, 0x43)}, None, [(b"W2ru", "b.raw")]))
    with tempfile.TemporaryDirectory() as t:
        for name, opts, size in [("qemu-fixed.vhd", "subformat=fixed,force_size=on", "8K"),
                                 ("qemu-dynamic.vhd", "subformat=dynamic", "1M")]:
            p = os.path.join(t, name)
            subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", opts, p, size], check=True)
            with open(p, "rb") as src:
                write(os.path.join(SEEDS, name), src.read())


main()
