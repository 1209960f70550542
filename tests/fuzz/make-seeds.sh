#!/usr/bin/env bash
# Remakes the seed corpus (seeds/) and the backing files the fuzz target embeds (fixtures/) with
# qemu-img/qemu-io. Small images only: small clusters, a few MiB of virtual size.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf seeds fixtures && mkdir -p seeds fixtures
t=$(mktemp -d) && trap 'rm -rf "$t"' EXIT
io() { qemu-io -f qcow2 "$@" >/dev/null; }
mk() { qemu-img create -q -f qcow2 "$@"; }

# Fixtures: b.raw (the raw backing file) and b.qcow2 (a qcow2 backing file on top of b.raw). The
# target writes each input as a.qcow2 next to them, so a seed's backing name "b.raw", "b.qcow2" or
# "a.qcow2" (itself) resolves.
qemu-img create -q -f raw fixtures/b.raw 64K
qemu-io -f raw -c 'write -P 0x5a 0 8K' -c 'write -P 0x11 32K 4K' fixtures/b.raw >/dev/null
(cd fixtures && mk -o cluster_size=512 -b b.raw -F raw b.qcow2 128K && io -c 'write -P 0x66 4K 2K' b.qcow2)

# Versions 2 and 3, data and zero clusters, a few cluster sizes and refcount widths.
mk -o compat=0.10,cluster_size=512 seeds/v2-512.qcow2 1M
io -c 'write -P 0xaa 0 3K' -c 'write -P 0xbb 600K 1K' seeds/v2-512.qcow2
for cs in 512 1024 4096; do
  mk -o cluster_size=$cs seeds/v3-$cs.qcow2 2M
  io -c "write -P 0xcc 0 8K" -c "write -z 64K 8K" -c "write -P 0xdd 1M 4K" seeds/v3-$cs.qcow2
done
mk -o cluster_size=2048,refcount_bits=1 seeds/refcount1.qcow2 1M
io -c 'write -P 1 0 4K' seeds/refcount1.qcow2
mk -o cluster_size=2048,refcount_bits=64 seeds/refcount64.qcow2 1M
io -c 'write -P 2 4K 4K' seeds/refcount64.qcow2
mk -o cluster_size=512 seeds/empty-v3.qcow2 64K

# Compressed clusters, zlib and zstd.
qemu-img create -q -f raw "$t/pat.raw" 256K
qemu-io -f raw -c 'write -P 0x41 0 64K' -c 'write -P 0x42 128K 16K' "$t/pat.raw" >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4096 "$t/pat.raw" seeds/zlib.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd "$t/pat.raw" seeds/zstd.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=512,compat=0.10 "$t/pat.raw" seeds/zlib-v2-512.qcow2

# Internal snapshots.
mk -o cluster_size=1024 seeds/snapshots.qcow2 1M
io -c 'write -P 0x10 0 4K' seeds/snapshots.qcow2
qemu-img snapshot -c first seeds/snapshots.qcow2
io -c 'write -P 0x20 2K 4K' seeds/snapshots.qcow2
qemu-img snapshot -c second seeds/snapshots.qcow2
io -c 'write -z 0 1K' seeds/snapshots.qcow2

# Extended L2 (subclusters; needs clusters of 16 KiB or more).
mk -o cluster_size=16384,extended_l2=on seeds/extl2.qcow2 1M
io -c 'write -P 0x77 512 1K' -c 'write -z 8K 2K' seeds/extl2.qcow2
mk -o cluster_size=16384,extended_l2=on,compression_type=zstd seeds/extl2-zstd.qcow2 1M
io -c 'write -P 0x78 0 16K' seeds/extl2-zstd.qcow2

# Backing files: raw, qcow2, probed format, itself.
mk -o cluster_size=512 -u -b b.raw -F raw seeds/over-raw.qcow2 64K
mk -o cluster_size=512 -u -b b.qcow2 -F qcow2 seeds/over-qcow2.qcow2 128K
# No backing format: the reader probes it. qemu-img insists on -F, so drop the extension after.
mk -o cluster_size=512 -u -b b.qcow2 -F qcow2 seeds/over-probed.qcow2 256K
python3 - seeds/over-probed.qcow2 <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, 'rb').read())
i = b.find(bytes.fromhex('e2792aca'))
b[i:i + 4] = bytes.fromhex('0000abcd')  # an unknown extension type: skipped by readers
open(p, 'wb').write(b)
PY
mk -o cluster_size=512 -u -b a.qcow2 -F qcow2 seeds/over-self.qcow2 64K
