#!/bin/bash
# Remakes seeds-vhdx/ and fixtures/p.vhdx.pages for the vhdx fuzz target: VHDX files made by
# qemu-img and kiln (1 MiB blocks, so the first payload blocks land on the target's pages), a
# copy with a log entry to replay and a differencing child of p.vhdx, each packed as the target
# reads inputs: the 4 KiB pages at its PAGES offsets, then the file's length in MiB.
# Run from the repository root after `cargo build`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kiln=${KILN:-$here/../../target/debug/kiln}
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
cd "$w"
qemu-img create -q -f raw src.raw 3M
qemu-io -f raw -c "write -P 0x11 0 64k" -c "write -P 0x22 1M 4k" -c "write -P 0x33 2M 8k" src.raw >/dev/null
qemu-img convert -O vhdx -o block_size=1M src.raw dynamic.vhdx
qemu-img convert -O vhdx -o block_size=1M,subformat=fixed,block_state_zero=off src.raw fixed.vhdx
qemu-img convert -O vhdx -o block_size=1M,block_state_zero=off src.raw nozero.vhdx
qemu-img create -q -f vhdx -o block_size=1M empty.vhdx 3M
"$kiln" convert -O vhdx -o block_size=1M src.raw kiln.vhdx
cp dynamic.vhdx p.vhdx
python3 - <<'PY'
import struct

POLY = 0x82F63B78
TABLE = []
for i in range(256):
    c = i
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    TABLE.append(c)

def crc32c(b):
    c = 0xFFFFFFFF
    for x in b:
        c = TABLE[(c ^ x) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF

def fix(b, at, n):
    b[at + 4:at + 8] = b"\0\0\0\0"
    b[at + 4:at + 8] = struct.pack("<I", crc32c(bytes(b[at:at + n])))

K, M = 1024, 1 << 20
PAGES = [0, 64*K, 128*K, 192*K, 256*K, M, M+4*K, 2*M, 2*M+32*K, 2*M+64*K, 2*M+128*K, 3*M, 3*M+32*K, 3*M+64*K, 3*M+128*K,
         4*M, 5*M, 6*M, 7*M, 8*M, 9*M, 10*M, 11*M]

def pack(src, dst):
    b = open(src, "rb").read()
    out = bytearray()
    for at in PAGES:
        page = b[at:at + 4096]
        out += page + bytes(4096 - len(page))
    while out and not any(out[-4096:]):
        del out[-4096:]
    out.append(min(32, (len(b) + M - 1) // M))
    open(dst, "wb").write(bytes(out))

def cur(b):
    s1, s2 = struct.unpack_from("<Q", b, 64*K + 8)[0], struct.unpack_from("<Q", b, 128*K + 8)[0]
    return 128*K if s2 >= s1 else 64*K

def regions(b):
    r = {}
    for i in range(struct.unpack_from("<I", b, 192*K + 8)[0]):
        e = 192*K + 16 + 32*i
        r[b[e]] = struct.unpack_from("<Q", b, e + 16)[0]
    return r[0x66], r[0x06]

# A log entry that writes one sector of block 0 and zeroes 8 KiB of it.
b = bytearray(open("dynamic.vhdx", "rb").read())
h = cur(b); log = struct.unpack_from("<Q", b, h + 72)[0]
bat, md = regions(b)
blk0 = (struct.unpack_from("<Q", b, bat)[0] >> 20) << 20
seq, guid = 7, b"kiln-log-guid-01"
e = bytearray(8192)
struct.pack_into("<4sIIIQII16sQQ", e, 0, b"loge", 0, 8192, 0, seq, 2, 0, guid, len(b), len(b))
struct.pack_into("<4s4s8sQQ", e, 64, b"desc", b"TAIL", b"LEADING!", blk0 + 4096, seq)
struct.pack_into("<4sIQQQ", e, 96, b"zero", 0, 8192, blk0 + 16384, seq)
struct.pack_into("<4sI", e, 4096, b"data", seq >> 32)
e[4104:8188] = b"\x77" * 4084
struct.pack_into("<I", e, 8188, seq & 0xFFFFFFFF)
fix(e, 0, 8192)
b[log:log + 8192] = e
b[h + 48:h + 64] = guid
fix(b, h, 4096)
open("log.vhdx", "wb").write(b)

# A differencing child of p.vhdx: HasParent, a locator naming p.vhdx, block 0 partially
# present (its first 8 sectors) with the sector bitmap at 7 MiB.
p = open("p.vhdx", "rb").read()
c = bytearray(open("dynamic.vhdx", "rb").read())
n = struct.unpack_from("<H", c, md + 10)[0]
for i in range(n):
    ent = md + 32 + 32*i
    if c[ent] == 0x37:
        struct.pack_into("<I", c, md + struct.unpack_from("<I", c, ent + 16)[0] + 4, 2)
ph = cur(p)
g = p[ph + 32:ph + 48]
link = "{%08X-%04X-%04X-%02X%02X-%s}" % (struct.unpack_from("<I", g, 0)[0], struct.unpack_from("<H", g, 4)[0],
    struct.unpack_from("<H", g, 6)[0], g[8], g[9], "".join("%02X" % x for x in g[10:]))
kv = [("parent_linkage", link), ("relative_path", ".\\p.vhdx")]
loc = bytearray(20 + 12*len(kv))
loc[0:16] = bytes([0xb7,0xef,0x4a,0xb0,0x9e,0xd1,0x81,0x4a,0xb7,0x89,0x25,0xb8,0xe9,0x44,0x59,0x13])
struct.pack_into("<H", loc, 18, len(kv))
for i, (k, v) in enumerate(kv):
    ko = len(loc); loc += k.encode("utf-16-le"); vo = len(loc); loc += v.encode("utf-16-le")
    struct.pack_into("<IIHH", loc, 20 + 12*i, ko, vo, vo - ko, len(loc) - vo)
ent = md + 32 + 32*n
c[ent:ent + 16] = bytes([0x2d,0x5f,0xd3,0xa8,0x0b,0xb3,0x4d,0x45,0xab,0xf7,0xd3,0xd8,0x48,0x34,0xab,0x0c])
struct.pack_into("<III", c, ent + 16, 128*K, len(loc), 4)
struct.pack_into("<H", c, md + 10, n + 1)
c[md + 128*K:md + 128*K + len(loc)] = loc
struct.pack_into("<Q", c, bat, 7 | (blk0 >> 20 << 20))
struct.pack_into("<Q", c, bat + 4096*8, 6 | (7 << 20))
c[7*M] = 0xff
open("child.vhdx", "wb").write(c)

for name in ["dynamic", "fixed", "nozero", "empty", "kiln", "log", "child"]:
    pack(name + ".vhdx", "seed-" + name)
pack("p.vhdx", "p.vhdx.pages")
PY
mkdir -p "$here/seeds-vhdx" "$here/fixtures"
cp seed-* "$here/seeds-vhdx/"
cp p.vhdx.pages "$here/fixtures/"
ls -l "$here/seeds-vhdx" "$here/fixtures/p.vhdx.pages"
