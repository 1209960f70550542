#!/usr/bin/env bash
# Runs kiln and the qemu-img pipelines side by side on the same files and prints medians, peak memory,
# CPU use and ratios as Markdown tables, like for like: kiln's durable default (every output fsynced)
# against qemu-img followed by `sync`, and `kiln -t unsafe` (never flushes) against plain qemu-img,
# which never flushes either. Then it measures the machine's primitives (SHA-256 per core, memory
# copy, durable write bandwidth, cores) and computes a lower bound for J1 and J2 from the bytes each
# must read, write and hash; kiln's time is reported against that bound. Last, issue 16's J1 targets
# (CPU use, kiln ÷ limit, kiln ÷ user pipeline + sync, kiln ÷ tuned pipeline + sync), met or missed.
#
#   benches/compare.sh [CORPUS_DIR] [OUT_DIR]
#
# CORPUS_DIR (default /tmp/kiln-corpus) is built with ../shared/bench/make-corpus.sh when missing.
# OUT_DIR (default CORPUS_DIR/out) holds the outputs of one run at a time. RUNS (default 5) timed runs
# per job, after one warm-up; SLOW_RUNS (default 3) for the compressed-output jobs; ONLY=regex runs
# only the jobs whose name matches; LIMIT=0 skips the machine's primitives. Commands alternate run by
# run (kiln, qemu-img + sync, kiln -t unsafe, qemu-img, kiln, ...), with the page cache warm (the
# warm-up reads every source), and `sync` before each run (outside the timed part).
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
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
# 1 TiB raw with 64 MiB of data, for "cost follows data".
# TERA (default CORPUS_DIR/tera.raw) names it when the corpus is read-only.
TERA=${TERA:-$C/tera.raw}
if [ ! -f "$TERA" ]; then
  truncate -s 1T "$TERA"
  for i in $(seq 0 63); do dd if=/dev/urandom of="$TERA" bs=1M count=1 seek=$((i * 16384 + 3)) conv=notrunc status=none; done
fi

# time_cmd FILE CMD...: runs CMD in a clean $O, appends "seconds peak_kib cpu_percent" to $TIMES/FILE.
# CPU percent is /usr/bin/time's %P, the "Percent of CPU this job got" of `time -v`: (user + system)
# / wall time, over the whole pipeline.
time_cmd() {
  local name=$1; shift
  rm -rf "$O"; mkdir -p "$O"
  sync   # earlier outputs' writeback must not land in this run's time
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M %P' -o "$O.mem" bash -c "$*" >/dev/null 2>"$O.err" || { echo "FAILED: $name: $*" >&2; cat "$O.err" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc -l) $(tail -1 "$O.mem" | tr -d %)" >>"$TIMES/$name"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
# col JOB LABEL N: column N of JOB's LABEL runs: its median (time, CPU) or maximum (memory)
med() { cut -d' ' -f"$3" "$TIMES/$1.$2" | median; }
range() { cut -d' ' -f1 "$TIMES/$1.$2" | sort -n | awk 'NR==1 {lo=$1} {hi=$1} END {printf "%.2f–%.2f", lo, hi}'; }
peak() { cut -d' ' -f2 "$TIMES/$1.$2" | sort -n | tail -1; }

TIMES=${TIMES:-$(mktemp -d)}   # raw times per job and command, one "seconds peak_kib cpu%" line per run
declare -a ROWS
# bench NAME RUNS LABEL CMD [LABEL CMD]...: one warm-up of each command, then RUNS rounds of every
# command in turn.
bench() {
  local name=$1 runs=$2; shift 2
  [[ $name =~ $ONLY ]] || return 0
  local -a labels=() cmds=()
  while (($#)); do labels+=("$1"); cmds+=("$2"); shift 2; done
  echo "== $name" >&2
  # Warm the cache with the corpus (not tera.raw: reading its 1 TiB of holes takes minutes).
  for f in "$C"/sys* "$C"/data-*; do cat "$f" >/dev/null; done
  local i
  for i in "${!cmds[@]}"; do time_cmd warm "${cmds[$i]}"; done
  for _ in $(seq "$runs"); do
    for i in "${!cmds[@]}"; do time_cmd "$name.${labels[$i]}" "${cmds[$i]}"; done
  done
}
# row NAME A B: a table row setting command A's median against command B's.
row() {
  local name=$1 a=$2 b=$3
  [[ $name =~ $ONLY ]] || return 0
  local ta tb
  ta=$(med "$name" "$a" 1); tb=$(med "$name" "$b" 1)
  ROWS+=("| $name | $a | $(printf %.2f "$ta") ($(range "$name" "$a")) | $(($(peak "$name" "$a") / 1024)) | $(med "$name" "$a" 3)% | $b | $(printf %.2f "$tb") ($(range "$name" "$b")) | $(($(peak "$name" "$b") / 1024)) | $(med "$name" "$b" 3)% | $(printf %.2f "$(echo "$ta / $tb" | bc -l)") |")
}

QI="qemu-img convert -W -m 16"
# --- J1 / J2: full create, qcow2 output with SHA256SUMS
for ext in raw qcow2; do
  job=J1; [ $ext = qcow2 ] && job=J2
  kcmd="$KILN create -q --name $job --disk snapshot=$C/sys.$ext,type=system --disk snapshot=$C/data-fs.$ext --disk snapshot=$C/data-rand.$ext --disk snapshot=$C/data-sparse.$ext --disk snapshot=$C/data-zero.$ext --disk size=20G --output-dir $O/img"
  user="$QI -O qcow2 $C/sys.$ext $O/xvda.qcow2 && $QI -O qcow2 $C/data-fs.$ext $O/xvdb.qcow2 && $QI -O qcow2 $C/data-rand.$ext $O/xvdc.qcow2 && $QI -O qcow2 $C/data-sparse.$ext $O/xvdd.qcow2 && $QI -O qcow2 $C/data-zero.$ext $O/xvde.qcow2 && qemu-img create -q -f qcow2 $O/xvdf.qcow2 20G && (cd $O && sha256sum *.qcow2 > SHA256SUMS)"
  tuned="($QI -O qcow2 $C/sys.$ext $O/xvda.qcow2 & $QI -O qcow2 $C/data-fs.$ext $O/xvdb.qcow2 & $QI -O qcow2 $C/data-rand.$ext $O/xvdc.qcow2 & $QI -O qcow2 $C/data-sparse.$ext $O/xvdd.qcow2 & $QI -O qcow2 $C/data-zero.$ext $O/xvde.qcow2 & qemu-img create -q -f qcow2 $O/xvdf.qcow2 20G & wait) && (cd $O && openssl dgst -sha256 *.qcow2 > SHA256SUMS)"
  name="$job-create-from-$ext"
  eval "KCMD_$job=\$kcmd"
  bench "$name" "$RUNS" kiln "$kcmd" "user+sync" "$user && sync" "tuned+sync" "$tuned && sync" \
    "kiln-t-unsafe" "${kcmd/create -q/create -q -t unsafe}" user "$user" tuned "$tuned"
  row "$name" kiln "user+sync"; row "$name" kiln "tuned+sync"
  row "$name" kiln-t-unsafe user; row "$name" kiln-t-unsafe tuned
  row "$name" kiln user; row "$name" kiln tuned
done
# --- convert, one disk each way: kiln (fsynced) against qemu-img + sync; kiln -t unsafe against qemu-img
conv() {
  local name=$1 kargs=$2 qargs=$3
  bench "$name" "$RUNS" kiln "$KILN convert $kargs" "qemu-img+sync" "$QI $qargs && sync" \
    "kiln-t-unsafe" "$KILN convert -t unsafe $kargs" qemu-img "$QI $qargs"
  row "$name" kiln "qemu-img+sync"; row "$name" kiln-t-unsafe qemu-img
}
for d in sys data-rand; do
  conv "convert-$d-raw-raw" "-O raw $C/$d.raw $O/o.raw" "-O raw $C/$d.raw $O/o.raw"
  conv "convert-$d-raw-qcow2" "-O qcow2 $C/$d.raw $O/o.qcow2" "-O qcow2 $C/$d.raw $O/o.qcow2"
  conv "convert-$d-qcow2-qcow2" "-O qcow2 $C/$d.qcow2 $O/o.qcow2" "-O qcow2 $C/$d.qcow2 $O/o.qcow2"
  conv "convert-$d-qcow2-raw" "-O raw $C/$d.qcow2 $O/o.raw" "-O raw $C/$d.qcow2 $O/o.raw"
done
conv "convert-sys-c-qcow2-raw" "-O raw $C/sys-c.qcow2 $O/o.raw" "-O raw $C/sys-c.qcow2 $O/o.raw"
# --- compressed output
RUNS=$SLOW_RUNS conv "compress-zlib-sys" "-O qcow2 -c zlib $C/sys.raw $O/o.qcow2" "-c -O qcow2 $C/sys.raw $O/o.qcow2"
RUNS=$SLOW_RUNS conv "compress-zstd-sys" "-O qcow2 -c zstd $C/sys.raw $O/o.qcow2" "-c -O qcow2 -o compression_type=zstd $C/sys.raw $O/o.qcow2"
# --- vSphere OVA of sys + data-rand: kiln writes each VMDK straight into the archive; the usual
# pipeline converts each disk to a streamOptimized VMDK, hashes them into a .mf beside a stub .ovf,
# then tars the lot (a second full copy of every disk on local storage).
ova_user="$QI -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic $C/sys.raw $O/o-disk1.vmdk && $QI -O vmdk -o subformat=streamOptimized,adapter_type=lsilogic $C/data-rand.raw $O/o-disk2.vmdk && echo '<Envelope/>' > $O/o.ovf && (cd $O && sha256sum --tag o.ovf o-disk1.vmdk o-disk2.vmdk | sed 's/^SHA256 (\(.*\)) = /SHA256(\1)= /' > o.mf && tar -cf o.ova o.ovf o.mf o-disk1.vmdk o-disk2.vmdk)"
ova_kiln="$KILN create -q --name ova --target vsphere --disk snapshot=$C/sys.raw,type=system --disk snapshot=$C/data-rand.raw --output-dir $O/img"
RUNS=$SLOW_RUNS bench ova-sys-data-rand "$SLOW_RUNS" kiln "$ova_kiln" "qemu-img+tar+sync" "$ova_user && sync" \
  "kiln-t-unsafe" "${ova_kiln/create -q/create -q -t unsafe}" "qemu-img+tar" "$ova_user"
row ova-sys-data-rand kiln "qemu-img+tar+sync"; row ova-sys-data-rand kiln-t-unsafe "qemu-img+tar"
# --- GCP's archive: kiln streams DEVICE.tar.gz from the source (no disk.raw on local storage); the
# documented pipeline writes disk.raw, then `tar --format=oldgnu -Sczf` reads it back
gcp="cd $O && $QI -O raw $C/sys.qcow2 disk.raw && tar --format=oldgnu -Sczf sys.tar.gz disk.raw && rm disk.raw"
kgcp="$KILN create -q --name gcp --snapshot $C/sys.qcow2 --target gcp --output-dir $O/img"
bench "gcp-archive-sys" "$SLOW_RUNS" kiln "$kgcp" "qemu-img+tar+sync" "$gcp && sync" \
  "kiln-t-unsafe" "${kgcp/create -q/create -q -t unsafe}" "qemu-img+tar" "$gcp"
row "gcp-archive-sys" kiln "qemu-img+tar+sync"; row "gcp-archive-sys" kiln-t-unsafe "qemu-img+tar"
# --- cost follows data: 1 TiB virtual, 64 MiB of data
conv "tera-raw-qcow2" "-O qcow2 $TERA $O/o.qcow2" "-O qcow2 $TERA $O/o.qcow2"
# --- other formats (issue 12), each against qemu-img writing or reading the same format:
# streamOptimized VMDK of sys.raw (goal: kiln at least 3x faster), then data-rand.raw written and
# read back as fixed VHD (qemu-img with force_size, as kiln sizes it), dynamic VHDX and
# monolithicSparse VMDK (goal: at least as fast, durability equal in each row).
# FMTS (default FMTS_DIR=CORPUS_DIR) holds the VHD/VHDX/VMDK copies of data-rand that the read
# rows start from, made once with qemu-img.
FMTS=${FMTS_DIR:-$C}
for f in "vpc:vhd:subformat=fixed,force_size=on" "vhdx:vhdx:subformat=dynamic" "vmdk:vmdk:subformat=monolithicSparse"; do
  IFS=: read -r qf ext opts <<<"$f"
  [ -f "$FMTS/data-rand.$ext" ] || qemu-img convert -O "$qf" -o "$opts" "$C/data-rand.raw" "$FMTS/data-rand.$ext"
done
RUNS=$SLOW_RUNS conv "vmdk-stream-sys-raw" "-O vmdk $C/sys.raw $O/o.vmdk" "-O vmdk -o subformat=streamOptimized $C/sys.raw $O/o.vmdk"
conv "write-data-rand-vhd" "-O vhd $C/data-rand.raw $O/o.vhd" "-O vpc -o subformat=fixed,force_size=on $C/data-rand.raw $O/o.vhd"
conv "write-data-rand-vhdx" "-O vhdx $C/data-rand.raw $O/o.vhdx" "-O vhdx -o subformat=dynamic $C/data-rand.raw $O/o.vhdx"
conv "write-data-rand-vmdk" "-O vmdk -o subformat=monolithicSparse $C/data-rand.raw $O/o.vmdk" "-O vmdk -o subformat=monolithicSparse $C/data-rand.raw $O/o.vmdk"
for ext in vhd vhdx vmdk; do
  conv "read-data-rand-$ext" "-O raw $FMTS/data-rand.$ext $O/o.raw" "-O raw $FMTS/data-rand.$ext $O/o.raw"
done

echo
echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); $(qemu-img --version | head -1); kiln $($KILN --version | cut -d' ' -f2)"
echo "Medians of $RUNS runs ($SLOW_RUNS for compress-* and gcp-*) with min–max, warm page cache, outputs on $(df --output=fstype "$O" | tail -1); load average before: $LOAD0, after: $(cut -d' ' -f1-3 /proc/loadavg)."
echo
echo "| job | kiln | kiln s (min–max) | kiln peak MiB | kiln CPU | baseline | baseline s (min–max) | baseline peak MiB | baseline CPU | kiln / baseline |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"

[ "${LIMIT:-1}" = 0 ] || . "$here/benches/limit.sh"

# Issue 16's targets for J1, from the rows above (kiln's default, fsynced, like for like).
if [ -f "$TIMES/J1-create-from-raw.kiln" ]; then
  j=J1-create-from-raw
  k=$(med $j kiln 1)
  ratio() { printf %.2f "$(echo "$k / $(med $j "$1" 1)" | bc -l)"; }
  verdict() { if [ "$(echo "$1 $2 $3" | bc -l)" = 1 ]; then echo met; else echo missed; fi; }
  cpu=$(med $j kiln 3)
  echo
  echo "| J1 target (issue 16) | goal | measured | |"
  echo "|---|---|---|---|"
  echo "| CPU use (\`time\` %P, kiln fsynced) | ≥ 180% | $cpu% | $(verdict "$cpu" '>=' 180) |"
  if [ -n "${LIM_J1:-}" ]; then
    r=$(printf %.2f "$(echo "$k / $LIM_J1" | bc -l)")
    echo "| kiln ÷ the machine's limit (durable) | ≤ 1.5 | $r | $(verdict "$r" '<=' 1.5) |"
  fi
  r=$(ratio user+sync); echo "| kiln ÷ user pipeline + sync | ≤ 0.25 | $r (÷ user pipeline without sync: $(ratio user)) | $(verdict "$r" '<=' 0.25) |"
  r=$(ratio tuned+sync); echo "| kiln ÷ tuned pipeline + sync | ≤ 0.6 | $r | $(verdict "$r" '<=' 0.6) |"
fi
rm -rf "$O" "$O.mem" "$O.err"
echo "Raw times: $TIMES" >&2
