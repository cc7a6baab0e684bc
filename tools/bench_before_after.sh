#!/usr/bin/env bash
# Same-run A/B of the kernel benchmarks on one GPU: a base source tree against this checkout.
#   git archive <rev> packages tools | tar -x -C /tmp/base      # a base tree (no .git needed)
#   bash tools/bench_before_after.sh /tmp/base OUT_DIR [NAME]
# Runs tools/bench_sparse.py (N 32K/128K, densities 1.0/0.05) and tools/bench_dilated.py
# (N 256K/1M, D=128, both head modes), each tree with its own tools and sources, alternating
# base/head so clock drift hits both; then tools/compare_runs.py writes NAME.{md,json}.
set -euo pipefail
base=$(cd "$1" && pwd); out=$(mkdir -p "$2" && cd "$2" && pwd); name=${3:-before_after}
head=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
run() {  # run TREE LABEL: both benchmarks from TREE's sources
  local tree=$1 label=$2 pp=""
  for s in "$tree"/packages/*/src; do pp="$s${pp:+:$pp}"; done
  (cd "$tree" && PYTHONPATH="$pp" python tools/bench_sparse.py --out "$out/$label" \
      --seq-lens 32768 131072 --densities 1.0 0.05 --suffix "$label" --skip-correctness >"$out/$label-sparse.log" 2>&1)
  (cd "$tree" && PYTHONPATH="$pp" python tools/bench_dilated.py --n 256K,1M --d 128 --modes split,all \
      --reps 3 --dense-max-n 256K --common-max-n 16K --no-check --out "$out/$label" --name "dilated_$label" \
      >"$out/$label-dilated.log" 2>&1)
  rm -f "$out/$label"/*.png
}
run "$base" base
run "$head" head
python "$head/tools/compare_runs.py" "$out/base" "$out/head" --out "$out" --name "$name"
