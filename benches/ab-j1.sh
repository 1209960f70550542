#!/bin/bash
# A/B of kiln binaries on J1 (compare.sh's kiln create, fsynced), alternating run by run.
#   benches/ab-j1.sh CORPUS_DIR ROUNDS BIN...
# Appends "BIN wall_s cpu_% user_s sys_s" per run to $LOG (default ./ab-j1.log); `sync` before each
# run, outside the timed part. Run one warm-up round first and throw its lines away.
set -euo pipefail
C=$1; N=$2; shift 2
O=${OUT:-$(mktemp -d)}; LOG=${LOG:-ab-j1.log}
for _ in $(seq 1 "$N"); do
  for b in "$@"; do
    rm -rf "$O/img"; sync
    /usr/bin/time -a -o "$LOG" -f "$b %e %P %U %S" "$b" create -q --name J1 \
      --disk snapshot="$C/sys.raw",type=system --disk snapshot="$C/data-fs.raw" \
      --disk snapshot="$C/data-rand.raw" --disk snapshot="$C/data-sparse.raw" \
      --disk snapshot="$C/data-zero.raw" --disk size=20G --output-dir "$O/img" >/dev/null
  done
done
rm -rf "$O/img"
