#!/usr/bin/env bash
# Object storage on loopback: kiln push/pull against `aws s3 cp` (the AWS CLI) on the same server,
# and `kiln create` from an s3:// raw source against the same create from the local file.
#
#   benches/s3.sh [CORPUS_DIR] [WORK_DIR]
#
# CORPUS_DIR (default /tmp/kiln-corpus) holds sys.qcow2 and data-rand.raw (../shared/bench/make-corpus.sh).
# WORK_DIR (default $TMPDIR) gets the server's data and the outputs, removed at the end. SERVER=s3s
# (default; s3s-fs from ~/.cargo/bin) or garage (one node). RUNS (default 3) timed runs of each,
# alternating; prints "job tool seconds user+sys" lines and the load average.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
C=${1:-/tmp/kiln-corpus}
W=$(mktemp -d "${2:-${TMPDIR:-/tmp}}/kiln-s3-bench.XXXXXX")
RUNS=${RUNS:-3}
SERVER=${SERVER:-s3s}
KILN=${KILN:-$here/target/release/kiln}
export PATH="$HOME/.cargo/bin:$PATH"
[ -x "$KILN" ] || (cd "$here" && cargo build --release >&2)
command -v aws >/dev/null || pip install -q awscli
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
trap 'kill $spid 2>/dev/null; rm -rf "$W"' EXIT
export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=benchsecretkey0123456789 AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
mkdir -p "$W/data"
s3s-fs --host 127.0.0.1 --port "$port" --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/data" >"$W/server.log" 2>&1 &
spid=$!
sleep 1
aws --endpoint-url "$AWS_ENDPOINT_URL" s3 mb s3://bench >/dev/null
# The image pushed: sys.qcow2 as its only disk (kiln writes it as a qcow2 of the same data).
"$KILN" create -q --name bench --disk "snapshot=$C/sys.qcow2,type=system" --output-dir "$W/img" >/dev/null
aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --quiet "$C/data-rand.raw" s3://bench/data-rand.raw
t() { # t JOB TOOL CMD...: one timed run
  local job=$1 tool=$2; shift 2
  sync
  /usr/bin/time -f "%e %U %S" -o "$W/t" "$@" >/dev/null 2>&1
  read -r e u s <"$W/t"
  printf '%s %s %.2f s, %.2f CPU-s\n' "$job" "$tool" "$e" "$(echo "$u + $s" | bc)"
}
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg); image disk $(du -b "$W/img/xvda.qcow2" | cut -f1) bytes"
for r in $(seq "$RUNS"); do
  aws --endpoint-url "$AWS_ENDPOINT_URL" s3 rm --quiet --recursive s3://bench/p/ || true
  t push kiln "$KILN" push -q "$W/img" s3://bench/p/
  t push aws aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --quiet "$W/img/xvda.qcow2" s3://bench/a/xvda.qcow2
  rm -rf "$W/pulled" "$W/a.qcow2"
  t pull kiln "$KILN" pull -q s3://bench/p/ "$W/pulled"
  t pull aws aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --quiet s3://bench/a/xvda.qcow2 "$W/a.qcow2"
  # Like for like: kiln's pull fsyncs what it wrote; the AWS CLI does not.
  rm -f "$W/a.qcow2"
  t pull aws+sync bash -c "aws --endpoint-url '$AWS_ENDPOINT_URL' s3 cp --quiet s3://bench/a/xvda.qcow2 '$W/a.qcow2' && sync"
  rm -rf "$W/o1" "$W/o2"
  t create-raw s3 "$KILN" create -q --name bench-create --disk snapshot=s3://bench/data-rand.raw,type=system --output-dir "$W/o1"
  rm -rf "$W/o1"
  t create-raw s3-j8 "$KILN" create -q -j 8 --name bench-create --disk snapshot=s3://bench/data-rand.raw,type=system --output-dir "$W/o1"
  t create-raw local "$KILN" create -q --name bench-create --disk "snapshot=$C/data-rand.raw,type=system" --output-dir "$W/o2"
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
