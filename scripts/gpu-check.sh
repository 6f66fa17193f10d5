#!/usr/bin/env bash
# The GPU check: on a machine with a GPU and no network, from the release binary built
# beforehand (`cargo build --release`, then carry target/release/margin-softmax).
# It lists the adapters, checks a few shapes against the f64 reference (off the tile
# grids, long rows, many classes), and runs the benchmark with JSON output.
#
#   scripts/gpu-check.sh [OUT_DIR]          (default: gpu-check-out)
#   BIN=path/to/margin-softmax ADAPTER=nvidia scripts/gpu-check.sh
#
# Exit status: 1 if any check fails, 2 if no adapter is found.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release/margin-softmax}"
OUT="${1:-gpu-check-out}"
ADAPTER_ARGS=()
if [ -n "${ADAPTER:-}" ]; then ADAPTER_ARGS=(--adapter "$ADAPTER"); fi
mkdir -p "$OUT"
if [ ! -x "$BIN" ]; then
  echo "gpu-check: no binary at $BIN; build it first with cargo build --release" >&2
  exit 2
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"

echo "== adapters"
"$BIN" adapters | tee "$OUT/adapters.txt" || exit 2

status=0
echo "== checks against the f64 reference"
: > "$OUT/check.txt"
for shape in "100 64 1000" "257 129 4099" "1024 512 20000" "33 4097 513" "2 70001 3"; do
  set -- $shape
  echo "-- B=$1 D=$2 C=$3" | tee -a "$OUT/check.txt"
  if ! "$BIN" check "${ADAPTER_ARGS[@]}" --batch "$1" --dim "$2" --classes "$3" | tee -a "$OUT/check.txt"; then
    echo "gpu-check: FAIL at B=$1 D=$2 C=$3" | tee -a "$OUT/check.txt"
    status=1
  fi
done

# Every GEMM candidate must give the same bits on this adapter too: the candidates test,
# where its prebuilt binary is carried (cargo test --release --test gemm_candidates
# --no-run prints its path; set CANDIDATES_TEST to it).
if [ -n "${CANDIDATES_TEST:-}" ] && [ -x "$CANDIDATES_TEST" ]; then
  echo "== GEMM candidates, bit for bit"
  "$CANDIDATES_TEST" --test-threads 1 2>&1 | tee "$OUT/candidates.txt" || status=1
fi

echo "== benchmark"
"$BIN" bench "${ADAPTER_ARGS[@]}" -- --quick --json "$OUT/bench-quick.jsonl" | tee "$OUT/bench-quick.txt" || status=1
"$BIN" bench "${ADAPTER_ARGS[@]}" -- --shapes 512x256x16384,1024x512x100000 --reps 10 \
  --json "$OUT/bench.jsonl" | tee "$OUT/bench.txt" || status=1

echo "== done: $OUT (status $status)"
exit "$status"
