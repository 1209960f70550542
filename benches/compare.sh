#!/usr/bin/env bash
# Runs kiln and the qemu-img pipelines side by side on the same files and prints medians, peak memory
# and ratios as a Markdown table.
#
#   benches/compare.sh [CORPUS_DIR] [OUT_DIR]
#
# CORPUS_DIR (default /tmp/kiln-corpus) is built with ../shared/bench/make-corpus.sh when missing.
# OUT_DIR (default CORPUS_DIR/out) holds the outputs of one run at a time. RUNS (default 5) timed runs
# per job, after one warm-up; SLOW_RUNS (default 3) for the compressed-output jobs; ONLY=regex runs
# only the jobs whose name matches. Tools alternate run by run (kiln, qemu-img, kiln, ...), with the
# page cache warm (the warm-up reads every source), and `sync` before each run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
C=${1:-/tmp/kiln-corpus}
O=${2:-$C/out}
RUNS=${RUNS:-5}
SLOW_RUNS=${SLOW_RUNS:-3}
ONLY=${ONLY:-.}
KILN=${KILN:-$here/target/release/kiln}

[ -f "$C/sys-c.qcow2" ] || bash "$here/../shared/bench/make-corpus.sh" "$C" >&2
[ -x "$KILN" ] || (cd "$here" && cargo build --release >&2)
command -v /usr/bin/time >/dev/null || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
mkdir -p "$O"
# 1 TiB raw with 64 MiB of data, for "cost follows data".
if [ ! -f "$C/tera.raw" ]; then
  truncate -s 1T "$C/tera.raw"
  for i in $(seq 0 63); do dd if=/dev/urandom of="$C/tera.raw" bs=1M count=1 seek=$((i * 16384 + 3)) conv=notrunc status=none; done
fi

# time_cmd NAME CMD...: runs CMD in a clean $O, appends "seconds peak_kib" to $O/../NAME.times
time_cmd() {
  local name=$1; shift
  rm -rf "$O"; mkdir -p "$O"
  sync   # earlier outputs' writeback must not land in this run's time
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$O.mem" bash -c "$*" >/dev/null 2>"$O.err" || { echo "FAILED: $name: $*" >&2; cat "$O.err" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc -l) $(tail -1 "$O.mem")" >>"$TIMES/$name"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

TIMES=${TIMES:-$(mktemp -d)}   # raw times per job, one "seconds peak_kib" line per run
declare -a ROWS
# bench NAME RUNS KILN_CMD BASE_CMD [BASE2_NAME BASE2_CMD]
bench() {
  local name=$1 runs=$2 kcmd=$3 bcmd=$4 b2name=${5:-} b2cmd=${6:-}
  [[ $name =~ $ONLY ]] || return 0
  echo "== $name" >&2
  # Warm the cache with the corpus (not tera.raw: reading its 1 TiB of holes takes minutes).
  for f in "$C"/sys* "$C"/data-*; do cat "$f" >/dev/null; done
  time_cmd warm "$kcmd"; time_cmd warm "$bcmd"
  for _ in $(seq "$runs"); do
    time_cmd "$name.kiln" "$kcmd"
    time_cmd "$name.base" "$bcmd"
    [ -z "$b2name" ] || time_cmd "$name.base2" "$b2cmd"
  done
  local k b km bm
  k=$(cut -d' ' -f1 "$TIMES/$name.kiln" | median); b=$(cut -d' ' -f1 "$TIMES/$name.base" | median)
  km=$(cut -d' ' -f2 "$TIMES/$name.kiln" | sort -n | tail -1); bm=$(cut -d' ' -f2 "$TIMES/$name.base" | sort -n | tail -1)
  ROWS+=("| $name | $(printf %.2f "$k") | $((km / 1024)) | qemu-img pipeline | $(printf %.2f "$b") | $((bm / 1024)) | $(printf %.2f "$(echo "$k / $b" | bc -l)") |")
  if [ -n "$b2name" ]; then
    local b2 b2m
    b2=$(cut -d' ' -f1 "$TIMES/$name.base2" | median); b2m=$(cut -d' ' -f2 "$TIMES/$name.base2" | sort -n | tail -1)
    ROWS+=("| $name | $(printf %.2f "$k") | $((km / 1024)) | $b2name | $(printf %.2f "$b2") | $((b2m / 1024)) | $(printf %.2f "$(echo "$k / $b2" | bc -l)") |")
  fi
}

QI="qemu-img convert -W -m 16"
# --- J1 / J2: full create, qcow2 output with SHA256SUMS
for ext in raw qcow2; do
  job=J1; [ $ext = qcow2 ] && job=J2
  kcmd="$KILN create -q --name $job --disk snapshot=$C/sys.$ext,type=system --disk snapshot=$C/data-fs.$ext --disk snapshot=$C/data-rand.$ext --disk snapshot=$C/data-sparse.$ext --disk snapshot=$C/data-zero.$ext --disk size=20G --output-dir $O/img"
  user="$QI -O qcow2 $C/sys.$ext $O/xvda.qcow2 && $QI -O qcow2 $C/data-fs.$ext $O/xvdb.qcow2 && $QI -O qcow2 $C/data-rand.$ext $O/xvdc.qcow2 && $QI -O qcow2 $C/data-sparse.$ext $O/xvdd.qcow2 && $QI -O qcow2 $C/data-zero.$ext $O/xvde.qcow2 && qemu-img create -q -f qcow2 $O/xvdf.qcow2 20G && (cd $O && sha256sum *.qcow2 > SHA256SUMS)"
  tuned="($QI -O qcow2 $C/sys.$ext $O/xvda.qcow2 & $QI -O qcow2 $C/data-fs.$ext $O/xvdb.qcow2 & $QI -O qcow2 $C/data-rand.$ext $O/xvdc.qcow2 & $QI -O qcow2 $C/data-sparse.$ext $O/xvdd.qcow2 & $QI -O qcow2 $C/data-zero.$ext $O/xvde.qcow2 & qemu-img create -q -f qcow2 $O/xvdf.qcow2 20G & wait) && (cd $O && openssl dgst -sha256 *.qcow2 > SHA256SUMS)"
  bench "$job-create-from-$ext" "$RUNS" "$kcmd" "$user" "tuned pipeline" "$tuned"
done
# --- convert, one disk each way
for d in sys data-rand; do
  bench "convert-$d-raw-raw" "$RUNS" "$KILN convert -O raw $C/$d.raw $O/o.raw" "$QI -O raw $C/$d.raw $O/o.raw"
  bench "convert-$d-raw-qcow2" "$RUNS" "$KILN convert -O qcow2 $C/$d.raw $O/o.qcow2" "$QI -O qcow2 $C/$d.raw $O/o.qcow2"
  bench "convert-$d-qcow2-qcow2" "$RUNS" "$KILN convert -O qcow2 $C/$d.qcow2 $O/o.qcow2" "$QI -O qcow2 $C/$d.qcow2 $O/o.qcow2"
  bench "convert-$d-qcow2-raw" "$RUNS" "$KILN convert -O raw $C/$d.qcow2 $O/o.raw" "$QI -O raw $C/$d.qcow2 $O/o.raw"
done
bench "convert-sys-c-qcow2-raw" "$RUNS" "$KILN convert -O raw $C/sys-c.qcow2 $O/o.raw" "$QI -O raw $C/sys-c.qcow2 $O/o.raw"
# --- compressed output
bench "compress-zlib-sys" "$SLOW_RUNS" "$KILN convert -O qcow2 -c zlib $C/sys.raw $O/o.qcow2" "$QI -c -O qcow2 $C/sys.raw $O/o.qcow2"
bench "compress-zstd-sys" "$SLOW_RUNS" "$KILN convert -O qcow2 -c zstd $C/sys.raw $O/o.qcow2" "$QI -c -O qcow2 -o compression_type=zstd $C/sys.raw $O/o.qcow2"
# --- cost follows data: 1 TiB virtual, 64 MiB of data
bench "tera-raw-qcow2" "$RUNS" "$KILN convert -O qcow2 $C/tera.raw $O/o.qcow2" "$QI -O qcow2 $C/tera.raw $O/o.qcow2"

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(qemu-img --version | head -1); kiln $($KILN --version | cut -d' ' -f2)"
echo "Medians of $RUNS runs ($SLOW_RUNS for compress-*), warm page cache, outputs on $(df --output=fstype "$O" | tail -1)."
echo
echo "| job | kiln s | kiln peak MiB | baseline | baseline s | baseline peak MiB | kiln / baseline |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
rm -rf "$O" "$O.mem" "$O.err"
echo "Raw times: $TIMES" >&2
