#!/usr/bin/env bash
# One rank's whole step (clip L2 1.0 + AdamW) against torch's clip_grad_norm_ + fused
# AdamW, interleaved run by run so both see the same machine, median of the runs' medians.
# Needs torch (pip install torch==2.15.0); never run by CI.
#   scripts/compare_step.sh [runs]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for params in 25000000 100000000; do
  for threads in 1 2; do
    ours=(); theirs=()
    for _ in $(seq "$runs"); do
      theirs+=("$(python3 scripts/torch_step.py --params "$params" --threads "$threads" 2>/dev/null | sed -n 's/.* \([0-9.]*\) ms\/step.*/\1/p')")
      ours+=("$(target/release/distoptim bench step --nproc 1 --strategies ddp --params "$params" --threads "$threads" | awk '$1=="ddp" {print $2}')")
    done
    o=$(printf '%s\n' "${ours[@]}" | med); t=$(printf '%s\n' "${theirs[@]}" | med)
    printf '%10d params, %d thread(s): distoptim %8.2f ms, torch %8.2f ms, ratio %.2f (runs: ours %s; torch %s)\n' \
      "$params" "$threads" "$o" "$t" "$(echo "$o / $t" | bc -l)" "${ours[*]}" "${theirs[*]}"
  done
done
