# Sourced by benches/compare.sh after its jobs (needs C, O, TIMES, KCMD_J1, KCMD_J2, med, time_cmd):
# measures this machine's primitives and computes a lower bound for J1's and J2's time from the
# bytes each must read, write and hash, then sets kiln's medians against it. Nothing here is kiln's:
# the primitives are dd, openssl, qemu-img and the kernel. To run it alone, run compare.sh with
# ONLY=J1 (or 'J1|J2'): the limit table needs the jobs' kiln rows.
#
# The bytes, counted the way kiln (or any tool that produces the same outputs) must move them:
# - read: the sources' data, `qemu-img map`'s extents with data and not zero (holes and qcow2 zero
#   clusters are never read; written zeros are, since only reading them shows they are zero);
# - written: the outputs' allocated bytes (`stat` %b × 512): kiln writes no holes and no zero
#   blocks, and allocates nothing ahead (no fallocate), so this is what reached the disk;
# - hashed: the outputs' sizes (`stat` %s): kiln's SHA-256 covers every byte of each file, and
#   hashes the holes of a sparse output as zeros (src/copy/hash.rs), which costs SHA-256 time like
#   any other byte; J1's and J2's outputs are qcow2, which has no holes to speak of.
#
# The bound is the largest of three times, each of which the job cannot beat:
# - CPU: every byte read copied once out of the page cache, every byte written copied once into it,
#   every output byte hashed once (no second read to hash: an ideal tool hashes while it writes),
#   spread over all cores;
# - durable write (fsynced rows only): the written bytes at the best durable bandwidth measured
#   here, the largest of one 3 GiB stream (`dd conv=fsync`, the old measure) and 4 files of 768 MiB
#   written at once with writeback started as they are written (`dd oflag=nocache`, which calls
#   posix_fadvise(DONTNEED) on each block written: the kernel starts its writeback, as kiln's
#   sync_file_range does) and each fsynced (`conv=fsync`), kiln's way of writing J1's 4 disks
#   with data. The data written is the corpus's random disk (cached), not zeros: this machine's
#   virtual disk wrote 3 GiB of zeros 2.3× faster than 3 GiB of random data;
# - one file's hash: the largest output hashed on one core (SHA-256 of one file is sequential).
# Not counted (so the bound stays a lower bound): kiln's re-read of each output to hash it, qcow2
# table work, zero detection, the kernel's writeback CPU, and any cache misses.

secs() { local t0; t0=$(date +%s.%N); "$@"; echo "$(date +%s.%N) - $t0" | bc -l; }
GIB=$((1 << 30))
cores=$(nproc)
# SHA-256 on one core, bytes/s (openssl with the CPU's SHA extensions, as kiln's sha2 uses them).
sha=$(openssl speed -evp sha256 -bytes 1048576 -seconds 3 2>/dev/null | awk '/^sha256/ {sub("k", "", $2); printf "%.0f", $2 * 1000}')
# Memory copy on one core: a cached 1 GiB file read into user memory (the read path's copy) ...
src=$C/data-rand.raw
cat "$src" >/dev/null
rd=$(echo "$(stat -c %s "$src") / $(secs dd if="$src" of=/dev/null bs=4M status=none)" | bc -l)
# ... and 1 GiB written into the page cache of a new file, not flushed (the write path's copy).
rm -rf "$O"; mkdir -p "$O"; sync
wr=$(echo "$GIB / $(secs dd if=/dev/zero of="$O/pc" bs=4M count=256 status=none)" | bc -l)
rm -f "$O/pc"; sync
# Durable write bandwidth, bytes/s, for 3 GiB of random data: one stream fsynced at the end ...
dur1=$(echo "3 * $GIB / $(secs bash -c "cat '$src' '$src' '$src' | dd of='$O/dw' bs=4M iflag=fullblock conv=fsync status=none")" | bc -l)
rm -f "$O/dw"; sync
# ... and 4 files at once, writeback started per block, each fsynced.
dur4=$(echo "3 * $GIB / $(secs bash -c "for i in 1 2 3 4; do dd if='$src' of='$O/dw\$i' bs=4M count=192 oflag=nocache conv=fsync status=none & done; wait")" | bc -l)
rm -f "$O"/dw*; sync
dur=$(printf '%s\n' "$dur1" "$dur4" | sort -g | tail -1)

declare -a NOTES=()
mb() { printf '%.0f' "$(echo "$1 / 1000000" | bc -l)"; }
# data_bytes FILE...: the bytes of data (not holes, not zero clusters) in each image, summed.
data_bytes() {
  local f s=0
  for f in "$@"; do
    s=$((s + $(qemu-img map --output=json "$f" | awk -F'[:,]' '/"data": true/ && /"zero": false/ {
      for (i = 1; i < NF; i++) if ($i ~ /"length"/) n += $(i + 1) } END {printf "%d", n}')))
  done
  echo "$s"
}
echo
echo "Machine primitives: $cores cores; SHA-256 $(mb "$sha") MB/s per core; page-cache read $(mb "$rd") MB/s and write $(mb "$wr") MB/s per core; durable write $(mb "$dur1") MB/s (one 3 GiB stream, dd conv=fsync) and $(mb "$dur4") MB/s (4 files of 768 MiB at once, dd oflag=nocache conv=fsync); the bound uses $(mb "$dur") MB/s. Load average now: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "| job | read MB | written MB | hashed MB | largest output MB | CPU bound s | durable-write bound s | one-file hash bound s | limit s (durable) | kiln s | kiln / limit | limit s (unflushed) | kiln -t unsafe s | kiln -t unsafe / limit |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for job in J1 J2; do
  name=$job-create-from-raw; [ $job = J2 ] && name=$job-create-from-qcow2
  [ -f "$TIMES/$name.kiln" ] || continue
  kcmd=$(eval echo "\$KCMD_$job")
  # One more run for the outputs' sizes.
  time_cmd "$name.limit-run" "$kcmd"
  # shellcheck disable=SC2046
  read_b=$(data_bytes $(echo "$kcmd" | grep -o 'snapshot=[^ ,]*' | cut -d= -f2))
  write_b=$(stat -c '%b * %B' "$O"/img/*.qcow2 | paste -sd+ | bc)
  hash_b=$(stat -c %s "$O"/img/*.qcow2 | paste -sd+ | bc)
  big=$(stat -c %s "$O"/img/*.qcow2 | sort -n | tail -1)
  cpu=$(echo "($read_b / $rd + $write_b / $wr + $hash_b / $sha) / $cores" | bc -l)
  dw=$(echo "$write_b / $dur" | bc -l)
  one=$(echo "$big / $sha" | bc -l)
  lim=$(printf '%s\n' "$cpu" "$dw" "$one" | sort -g | tail -1)
  lim_u=$(printf '%s\n' "$cpu" "$one" | sort -g | tail -1)
  k=$(med "$name" kiln 1); ku=$(med "$name" kiln-t-unsafe 1)
  eval "LIM_$job=\$lim"
  printf '| %s | %s | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n' "$job" \
    "$(mb "$read_b")" "$(mb "$write_b")" "$(mb "$hash_b")" "$(mb "$big")" "$cpu" "$dw" "$one" "$lim" "$k" \
    "$(echo "$k / $lim" | bc -l)" "$lim_u" "$ku" "$(echo "$ku / $lim_u" | bc -l)"
  # kiln below the bound means a primitive was measured too slow (the machine's load changed, or
  # the disk takes kiln's writes faster than dd's): say so rather than report a ratio below 1.
  if [ "$(echo "$k < $lim" | bc -l)" = 1 ]; then
    NOTES+=("$job: kiln ($k s) beat the bound ($lim s): kiln wrote $(mb "$(echo "$write_b / $k" | bc -l)") MB/s durably, faster than the durable bandwidth measured here, or another primitive was measured slow; the bound is not a bound on this run.")
  fi
done
for n in "${NOTES[@]}"; do echo; echo "$n"; done
