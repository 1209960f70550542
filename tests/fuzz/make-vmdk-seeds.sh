#!/usr/bin/env bash
# Remakes the VMDK fuzz target's seeds (seeds-vmdk/) and the files its descriptors name
# (fixtures-vmdk/) with qemu-img/qemu-io and kiln (build it first: `cargo build`). Small disks only.
set -euo pipefail
cd "$(dirname "$0")"
kiln=../../target/debug/kiln
rm -rf seeds-vmdk fixtures-vmdk && mkdir -p seeds-vmdk fixtures-vmdk
t=$(mktemp -d) && trap 'rm -rf "$t"' EXIT
io() { qemu-io -f vmdk "$@" >/dev/null; }

# Fixture: b.vmdk, a small monolithicSparse parent (the target writes it beside each input, with
# ../fixtures/b.raw as b.raw, so extent names "b.raw", "b.vmdk" and "a.vmdk" resolve).
qemu-img create -q -f vmdk fixtures-vmdk/b.vmdk 512K
io -c 'write -P 0x5a 0 64K' -c 'write -P 0x11 256K 4K' fixtures-vmdk/b.vmdk

qemu-img create -q -f raw "$t/src.raw" 1M
qemu-io -f raw -c 'write -P 0xaa 0 70K' -c 'write -P 0xbb 600K 1K' "$t/src.raw" >/dev/null
for sub in monolithicSparse streamOptimized; do
  qemu-img convert -O vmdk -o subformat=$sub "$t/src.raw" seeds-vmdk/qemu-$sub.vmdk
  "$kiln" convert -O vmdk -o subformat=$sub "$t/src.raw" seeds-vmdk/kiln-$sub.vmdk
done
qemu-img create -q -f vmdk -o zeroed_grain=on seeds-vmdk/zeroed-grain.vmdk 1M
io -c 'write -P 0xcc 0 64K' -c 'write -z 128K 64K' seeds-vmdk/zeroed-grain.vmdk
# A child whose parent is b.vmdk (relative name), made beside the fixture.
(cd fixtures-vmdk && qemu-img create -q -f vmdk -b b.vmdk -F vmdk child.vmdk && \
  qemu-io -f vmdk -c 'write -P 0x77 64K 64K' child.vmdk >/dev/null)
mv fixtures-vmdk/child.vmdk seeds-vmdk/child.vmdk
cat > seeds-vmdk/desc-extents.vmdk <<'END'
# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="twoGbMaxExtentFlat"

# Extent description
RW 64 FLAT "b.raw" 16
RW 16 ZERO
RDONLY 1024 SPARSE "b.vmdk"

# The Disk Data Base
ddb.adapterType = "lsilogic"
END
cat > seeds-vmdk/desc-parent.vmdk <<'END'
# Disk DescriptorFile
version=1
CID=12345678
parentCID=abcdef01
createType="monolithicFlat"
parentFileNameHint="b.vmdk"

RW 128 FLAT "b.raw" 0
END
