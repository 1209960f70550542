#!/usr/bin/env python3
"""Remakes the VDI fuzz seeds (seeds-vdi/): small hand-made VDIs with 4 KiB blocks (dynamic with
unallocated, discarded and allocated blocks; static), and qemu-img's own empty dynamic one. Run
from the repository root."""
import os
import struct
import subprocess
import tempfile

SEEDS = os.path.join("tests", "fuzz", "seeds-vdi")


def vdi(image_type, disk_size, bs, bmap, blocks):
    """bmap: entries; blocks: the data blocks, in file order."""
    h = bytearray(512)
    h[0:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    offset_bmap = 512
    offset_data = offset_bmap + ((len(bmap) * 4 + 511) // 512) * 512
    struct.pack_into("<IIIII", h, 0x40, 0xBEDA107F, 0x00010001, 0x190, image_type, 0)
    struct.pack_into("<IIIIIIIQIIII", h, 0x154, offset_bmap, offset_data, 0, 0, 0, 512, 0,
                     disk_size, bs, 0, len(bmap), len(blocks))
    table = b"".join(struct.pack("<I", e) for e in bmap)
    table += bytes((-len(table)) % 512)
    return bytes(h) + table + b"".join(blocks)


def main():
    os.makedirs(SEEDS, exist_ok=True)
    bs = 4096
    blk = lambda v: bytes([v]) * bs
    seeds = {
        "dynamic.vdi": vdi(1, 6 * bs, bs, [1, 0xFFFFFFFF, 0, 0xFFFFFFFE, 0xFFFFFFFF, 2],
                           [blk(0x71), blk(0x72), blk(0x73)]),
        "static.vdi": vdi(2, 3 * bs, bs, [0, 1, 2], [blk(0x74), blk(0x75), blk(0x76)]),
        "odd-size.vdi": vdi(1, 2 * bs + 700, bs, [0, 0xFFFFFFFF, 1], [blk(0x77), blk(0x78)]),
    }
    for name, data in seeds.items():
        with open(os.path.join(SEEDS, name), "wb") as out:
            out.write(data)
    with tempfile.TemporaryDirectory() as t:
        p = os.path.join(t, "qemu.vdi")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vdi", p, "4M"], check=True)
        with open(p, "rb") as src, open(os.path.join(SEEDS, "qemu-empty.vdi"), "wb") as out:
            out.write(src.read())


main()
