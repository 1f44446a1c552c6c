#!/usr/bin/env bash
# The runs and the analysis behind docs/analysis_gemma_wmt.md: Gemma-3-270M on WMT zh→en, CPU, 2 threads.
# A NeFT 3% run, a random-neuron 3% run and a full fine-tune (NeFT's reference run: same data, steps, batch,
# lr and seed, kept in the cache), 40 steps of batch 4 each (160 training sentences, one epoch; prompts cut
# to 96 tokens, targets to 64, to fit the shared 2-core CPU), then stage=analyze of base vs each over the
# first 100 WMT21 test sentences, with the paper's threshold and with 1%. Figures and summaries are copied
# to docs/figures/analysis_gemma_wmt/ (and its threshold_1pct/).
#   bash scripts/analysis_gemma_wmt.sh            # OUT=outputs/analysis_gemma_wmt by default
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${NEFT_LAB_SHARED_DATA:-../shared/data}
OUT=${OUT:-outputs/analysis_gemma_wmt}
DOCS=docs/figures/analysis_gemma_wmt
COMMON=(
  model=gemma3_270m task=wmt_zh_en
  task.data.train_dir="$DATA/wmt18-20_zh_en_train" task.data.test_dir="$DATA/wmt21_zh_en"
  task.data.max_train=160 task.data.max_val=32 task.data.max_test=100
  task.truncate_source=true task.max_prompt_tokens=96 task.max_target_tokens=64
  trainer.max_steps=40 trainer.val_check_interval=40 loader.batch_size=4 optim.lr=5e-5 budget=0.03 seed=0
  eval.after=false threads=2 logger=csv
)
time python -m neft_lab "${COMMON[@]}" strategy=neft hydra.run.dir="$OUT/neft"          # + the full reference run
time python -m neft_lab "${COMMON[@]}" strategy=random_neuron hydra.run.dir="$OUT/random"
# the reference run's folder, as the NeFT run's log names it (run now, or found in the cache)
FULL=$(grep -h -o -E "(reference run dir: |neuron scores from cache: ).*" "$OUT"/neft/*.log | tail -1 |
  sed -E 's/^(reference run dir: |neuron scores from cache: )//; s#/scores.safetensors$#/reference#')
ANALYZE=(stage=analyze "analysis.runs=[$OUT/neft,$FULL,$OUT/random]" analysis.max_sentences=100 threads=2 logger=none)
# 1. a threshold these short runs reach, 1% of all vectors (737 ranks): measures the four models
time python -m neft_lab "${ANALYZE[@]}" analysis.threshold=0.01 analysis.out="$OUT/analysis_threshold_1pct"
# 2. the paper's threshold (the default 0.142): the same tables, reused (seconds); last, so each run's
#    <run>/analysis/summary.json (read by stage=report) is against the default threshold
mkdir -p "$OUT/analysis" && cp -r "$OUT/analysis_threshold_1pct/utilization" "$OUT/analysis/"
time python -m neft_lab "${ANALYZE[@]}" analysis.out="$OUT/analysis"
copy() {  # an analysis folder's figures and JSON summaries (not the per-vector tables) into the docs
  mkdir -p "$2"
  cp "$1"/figures/*.png "$1/analysis.json" "$1/overlap.json" "$2/"
  for f in "$1"/compare/*.json; do cp "$f" "$2/compare_$(basename "$f")"; done
  for f in "$1"/utilization/*.json; do cp "$f" "$2/utilization_$(basename "$f")"; done
}
copy "$OUT/analysis" "$DOCS"
copy "$OUT/analysis_threshold_1pct" "$DOCS/threshold_1pct"
