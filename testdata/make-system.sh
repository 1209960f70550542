#!/usr/bin/env bash
# Builds testdata/system.qcow2: a 64 MiB GPT disk that boots UEFI on x86_64, with an ext4 root that
# says it is Debian 12. Needs sgdisk, mkfs.vfat, mtools, mkfs.ext4 and qemu-img; no root.
set -euo pipefail
out=${1:-system.qcow2}
t=$(mktemp -d); trap 'rm -rf "$t"' EXIT
truncate -s 64M "$t/disk.raw"
sgdisk -n1:2048:+16M -t1:ef00 -c1:EFI -n2:0:0 -t2:8304 -c2:root "$t/disk.raw" >/dev/null
# ESP: a FAT filesystem with \EFI\BOOT\BOOTX64.EFI (a PE header naming x86_64; not a real loader).
mkfs.vfat -C "$t/esp.img" 16384 >/dev/null
mmd -i "$t/esp.img" ::/EFI ::/EFI/BOOT
python3 - "$t/loader.efi" <<'PY'
import sys
b = bytearray(4096); b[0:2] = b"MZ"; b[0x3C] = 0x80; b[0x80:0x84] = b"PE\0\0"; b[0x84:0x86] = (0x8664).to_bytes(2, "little")
open(sys.argv[1], "wb").write(b)
PY
mcopy -i "$t/esp.img" "$t/loader.efi" ::/EFI/BOOT/BOOTX64.EFI
# Root: ext4 with /etc/os-release and a little content.
mkdir -p "$t/root/etc" "$t/root/usr/share/doc/kiln" "$t/root/var/log"
cat > "$t/root/etc/os-release" <<'OS'
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
OS
echo "kiln-sample" > "$t/root/etc/hostname"
head -c 1048576 /dev/urandom > "$t/root/usr/share/doc/kiln/random.bin"
seq 1 20000 > "$t/root/var/log/sample.log"
root_bytes=$(( (64 * 1024 * 1024) - (2048 + 32768) * 512 - 34 * 512 ))
root_bytes=$(( root_bytes / 4096 * 4096 ))
mkfs.ext4 -q -F -d "$t/root" "$t/root.img" "$(( root_bytes / 1024 ))k"
dd if="$t/esp.img" of="$t/disk.raw" bs=512 seek=2048 conv=notrunc,sparse status=none
dd if="$t/root.img" of="$t/disk.raw" bs=512 seek=$((2048 + 32768)) conv=notrunc,sparse status=none
sgdisk -v "$t/disk.raw" | grep -q "No problems found"
qemu-img convert -O qcow2 "$t/disk.raw" "$out"
cp --sparse=never "$out" "$out.full" && mv "$out.full" "$out"  # as git stores it: no holes in the file
