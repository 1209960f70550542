#!/usr/bin/env bash
# Object storage on loopback: kiln push/pull against `aws s3 cp` (the AWS CLI) on the same server,
# and `kiln create` from an s3:// raw source against the same create from the local file.
#
#   benches/s3.sh [CORPUS_DIR] [WORK_DIR]
#
# CORPUS_DIR (default /tmp/kiln-corpus) holds sys.qcow2 and data-rand.raw (../shared/bench/make-corpus.sh).
# WORK_DIR (default $TMPDIR) gets the server's data and the outputs, removed at the end. SERVER=s3s
# (default; s3s-fs from ~/.cargo/bin) or garage (one node, from ~/.cargo/bin). RUNS (default 3)
# timed runs of each, alternating; prints "job tool seconds, user+sys, server CPU" lines and the
# load average. A run that fails prints FAILED with its error and stops the script.
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
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
trap 'kill $spid 2>/dev/null; rm -rf "$W"' EXIT
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
mkdir -p "$W/data"
case $SERVER in
s3s)
  export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=benchsecretkey0123456789
  export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
  s3s-fs --host 127.0.0.1 --port "$port" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$W/data" >"$W/server.log" 2>&1 &
  spid=$!
  sleep 1
  aws --endpoint-url "$AWS_ENDPOINT_URL" s3 mb s3://bench >/dev/null
  ;;
garage)
  # One node, one copy of each block (replication_factor 1); its own key and bucket.
  rpc=$(free_port)
  cat >"$W/garage.toml" <<TOML
metadata_dir = "$W/data/meta"
data_dir = "$W/data/blocks"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.garage.localhost"
TOML
  g() { garage -c "$W/garage.toml" "$@"; }
  garage -c "$W/garage.toml" server >"$W/server.log" 2>&1 &
  spid=$!
  for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done
  g layout assign -z dc1 -c 100G "$(g node id -q | cut -d@ -f1)" >/dev/null
  g layout apply --version 1 >/dev/null
  key=$(g key create bench)
  AWS_ACCESS_KEY_ID=$(sed -n 's/.*Key ID: *//p' <<<"$key")
  AWS_SECRET_ACCESS_KEY=$(sed -n 's/.*Secret key: *//p' <<<"$key")
  export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION=garage AWS_DEFAULT_REGION=garage
  g bucket create bench >/dev/null
  g bucket allow --read --write --owner bench --key bench >/dev/null
  for _ in $(seq 50); do aws s3 ls s3://bench >/dev/null 2>&1 && break; sleep 0.2; done
  ;;
*) echo "SERVER=$SERVER: use s3s or garage" >&2; exit 2 ;;
esac
# The image pushed: sys.qcow2 as its only disk (kiln writes it as a qcow2 of the same data).
"$KILN" create -q --name bench --disk "snapshot=$C/sys.qcow2,type=system" --output-dir "$W/img" >/dev/null
aws --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --quiet "$C/data-rand.raw" s3://bench/data-rand.raw
server_cpu() { awk '{print $14 + $15}' "/proc/$spid/stat"; } # clock ticks, all threads
t() { # t JOB TOOL CMD...: one timed run, and the server's CPU time during it
  local job=$1 tool=$2 s0 s1; shift 2
  sync
  s0=$(server_cpu)
  if ! /usr/bin/time -f "%e %U %S" -o "$W/t" "$@" >/dev/null 2>"$W/err"; then
    echo "FAILED: $job $tool: $*"; cat "$W/err"; exit 1
  fi
  s1=$(server_cpu)
  read -r e u s < <(tail -1 "$W/t")
  printf '%s %s %.2f s, %.2f CPU-s, server %.2f CPU-s\n' "$job" "$tool" "$e" "$(echo "$u + $s" | bc)" \
    "$(echo "($s1 - $s0) / $(getconf CLK_TCK)" | bc -l)"
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
