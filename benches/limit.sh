# Sourced by benches/compare.sh after its jobs (needs C, O, TIMES, KCMD_J1, KCMD_J2, med, range):
# measures this machine's primitives and computes a lower bound for J1's and J2's time from the
# bytes each must read, write and hash, then sets kiln's medians against it.
#
# The bound: every byte read is copied once from the page cache, every byte written is copied once
# into it, every output byte is hashed; that CPU work spread over all cores, the output written
# durably at the measured bandwidth, and the largest output hashed on one core (SHA-256 of one file
# is sequential) each take at least their time, so the job takes at least the largest of the three.
# Nothing here is kiln's: the primitives are dd, openssl and the kernel.

secs() { local t0; t0=$(date +%s.%N); "$@"; echo "$(date +%s.%N) - $t0" | bc -l; }
GIB=$((1 << 30))
cores=$(nproc)
# SHA-256 on one core, bytes/s (openssl with the CPU's SHA extensions, as kiln's sha2 uses them).
sha=$(openssl speed -evp sha256 -bytes 1048576 -seconds 3 2>/dev/null | awk '/^sha256/ {sub("k", "", $2); printf "%.0f", $2 * 1000}')
# Memory copy on one core: a cached 1 GiB file read into user memory (the read path's copy) ...
cat "$C/data-rand.raw" >/dev/null
rd=$(echo "$(stat -c %s "$C/data-rand.raw") / $(secs dd if="$C/data-rand.raw" of=/dev/null bs=4M status=none)" | bc -l)
# ... and 1 GiB written into the page cache of a new file, not flushed (the write path's copy).
rm -rf "$O"; mkdir -p "$O"; sync
wr=$(echo "$GIB / $(secs dd if=/dev/zero of="$O/pc" bs=4M count=256 status=none)" | bc -l)
rm -f "$O/pc"; sync
# Durable write bandwidth: 3 GiB written and fsynced.
dur=$(echo "3 * $GIB / $(secs dd if=/dev/zero of="$O/dw" bs=4M count=768 conv=fsync status=none)" | bc -l)
rm -f "$O/dw"; sync

mb() { printf '%.0f' "$(echo "$1 / 1000000" | bc -l)"; }
echo
echo "Machine primitives: $cores cores; SHA-256 $(mb "$sha") MB/s per core; page-cache read $(mb "$rd") MB/s and write $(mb "$wr") MB/s per core; durable write $(mb "$dur") MB/s (3 GiB, dd conv=fsync)."
echo
echo "| job | read MB | written MB | hashed MB | largest output MB | CPU bound s | durable-write bound s | one-file hash bound s | limit s (durable) | kiln s | kiln / limit | limit s (unflushed) | kiln -t unsafe s | kiln -t unsafe / limit |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for job in J1 J2; do
  name=$job-create-from-raw; [ $job = J2 ] && name=$job-create-from-qcow2
  [ -f "$TIMES/$name.kiln" ] || continue
  kcmd=$(eval echo "\$KCMD_$job")
  # One more run for the output's sizes.
  time_cmd "$name.limit-run" "$kcmd"
  srcs=$(echo "$kcmd" | grep -o 'snapshot=[^ ,]*' | cut -d= -f2)
  # shellcheck disable=SC2086
  read_b=$(du -B1 -c $srcs | tail -1 | cut -f1)
  write_b=$(du -B1 -c "$O"/img/*.qcow2 | tail -1 | cut -f1)
  hash_b=$(stat -c %s "$O"/img/*.qcow2 | paste -sd+ | bc)
  big=$(stat -c %s "$O"/img/*.qcow2 | sort -n | tail -1)
  cpu=$(echo "($read_b / $rd + $write_b / $wr + $hash_b / $sha) / $cores" | bc -l)
  dw=$(echo "$write_b / $dur" | bc -l)
  one=$(echo "$big / $sha" | bc -l)
  lim=$(printf '%s\n' "$cpu" "$dw" "$one" | sort -g | tail -1)
  lim_u=$(printf '%s\n' "$cpu" "$one" | sort -g | tail -1)
  k=$(med "$name" kiln 1); ku=$(med "$name" kiln-t-unsafe 1)
  printf '| %s | %s | %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n' "$job" \
    "$(mb "$read_b")" "$(mb "$write_b")" "$(mb "$hash_b")" "$(mb "$big")" "$cpu" "$dw" "$one" "$lim" "$k" \
    "$(echo "$k / $lim" | bc -l)" "$lim_u" "$ku" "$(echo "$ku / $lim_u" | bc -l)"
done
