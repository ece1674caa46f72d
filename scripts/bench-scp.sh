#!/usr/bin/env bash
# C-STORE ingest benchmark (not a test, not in CI): storescu sends the same generated archive
# to dcmtk's storescp and to `fedcurate-node serve`, in the same run, both with TCP_NODELAY=1.
# The node answers success only after each object is flushed to its inbox; storescp does not
# flush. Usage: scripts/bench-scp.sh [instances] [matrix]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
matrix=${2:-256}
cargo build --release -q -p node
bin=target/release/fedcurate-node
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin" sample --out "$work/in" --patients $(( (n + 99) / 100 )) --slices 100 --matrix "$matrix" >/dev/null
count=$(find "$work/in" -name '*.dcm' | wc -l)
size=$(du -sm "$work/in" | cut -f1)
export TCP_NODELAY=1
mkdir -p "$work/storescp"
storescp -od "$work/storescp" -aet STORESCP 11199 & sleep 1
t0=$(date +%s.%N)
storescu -aet STORESCU -aec STORESCP +sd +r -R 127.0.0.1 11199 "$work/in"
t1=$(date +%s.%N)
kill %1; wait 2>/dev/null || true
printf 'data_dir = "%s/data"\n[scp]\nbind = "127.0.0.1:11198"\nallowed = [{ ae = "STORESCU" }]\n' "$work" > "$work/node.toml"
"$bin" --config "$work/node.toml" serve > "$work/serve.log" 2>/dev/null & sleep 1
t2=$(date +%s.%N)
storescu -aet STORESCU -aec FEDCURATE +sd +r -R 127.0.0.1 11198 "$work/in"
t3=$(date +%s.%N)
python3 - "$count" "$size" "$t0" "$t1" "$t2" "$t3" <<'PY'
import sys
n, mb, t0, t1, t2, t3 = int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:])
a, b = n / (t1 - t0), n / (t3 - t2)
print(f"{n} instances ({mb} MB)")
print(f"dcmtk storescp         {t1 - t0:7.2f} s  {a:8.0f} instances/s")
print(f"fedcurate-node serve   {t3 - t2:7.2f} s  {b:8.0f} instances/s (durable inbox)")
print(f"ratio node/storescp    {b / a:.2f}")
PY
