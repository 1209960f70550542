#!/usr/bin/env bash
# Peak bytes allocated under a directory while a command runs, against what is left at the end:
# how much local storage a pipeline needs beyond its result (an extra full copy of a disk shows as
# a peak near twice the result).
#
#   benches/peak-space.sh DIR CMD...
#
# Samples `du -sB1 DIR` (allocated bytes, staging directories included) every 50 ms while CMD runs
# and prints "peak_bytes final_bytes peak/final". DIR is emptied first.
set -euo pipefail
dir=$1; shift
rm -rf "$dir"; mkdir -p "$dir"
bash -c "$*" >/dev/null &
pid=$!
peak=0
while kill -0 "$pid" 2>/dev/null; do
  b=$(du -sB1 "$dir" 2>/dev/null | cut -f1 || echo 0)
  [ "${b:-0}" -gt "$peak" ] && peak=$b
  sleep 0.05
done
wait "$pid"
final=$(du -sB1 "$dir" | cut -f1)
[ "$final" -gt "$peak" ] && peak=$final
echo "$peak $final $(echo "scale=2; $peak / $final" | bc -l)"
