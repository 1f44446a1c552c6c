#!/usr/bin/env bash
# Copy what the table's report reads (per run: metrics.json, config.yaml, predictions.jsonl, csv/metrics.csv,
# .hydra/overrides.yaml, neuron_set.json; per grid: optimization_results.yaml) out of the run folders, without
# checkpoints, exports or neuron-set tensors, so that the published table can be made again from a clone of the repository:
#   OUT=outputs/table_small_cpu bash scripts/table_small_cpu_collect.sh
#   python -m neft_lab stage=report report.dir=benchmarks/results/table_small_cpu/final 'report.baseline=NeFT 9%'
set -euo pipefail
OUT=${OUT:-outputs/table_small_cpu}
DEST=${DEST:-benchmarks/results/table_small_cpu}
DEST=$(mkdir -p "$DEST" && cd "$DEST" && pwd)
cd "$OUT"
roots=()
for root in search final; do [ -d "$root" ] && roots+=("$root"); done
[ ${#roots[@]} -gt 0 ] || { echo "nothing to collect in $OUT (no search/ or final/)" >&2; exit 2; }
find "${roots[@]}" -path '*/report' -prune -o -type f \( -name metrics.json -o \( -name config.yaml -not -path '*/.hydra/*' \) -o -name predictions.jsonl \
    -o -name neuron_set.json -o -path '*/csv/metrics.csv' -o -name optimization_results.yaml -o -path '*/.hydra/overrides.yaml' \) -print |
  while read -r file; do
    mkdir -p "$DEST/$(dirname "$file")"
    cp "$file" "$DEST/$file"
  done
echo "copied $(find "$DEST" -type f | wc -l) files ($(du -sh "$DEST" | cut -f1)) to $DEST"
