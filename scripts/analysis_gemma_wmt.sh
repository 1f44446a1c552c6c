#!/usr/bin/env bash
# The runs and the analysis behind docs/analysis_gemma_wmt.md: Gemma-3-270M on WMT zh→en, CPU, 2 threads.
# Per seed (SEEDS, default "0 1"): a NeFT 3% run, a random-neuron 3% run and a full fine-tune (NeFT's reference
# run: same data, steps, batch, lr and seed, kept whole in the cache), 40 steps of batch 4 each (160 training
# sentences, one epoch; prompts cut to 96 tokens, targets to 64, to fit the shared 2-core CPU), then
# stage=analyze of base vs each over the first 100 WMT21 test sentences with the authors' statistic (the
# defaults of conf/config.yaml: Pearson with the mean state of each model's own greedy output, the outputs of
# layers l..L-1, max |r|, Rank per kind, Figure 2's buckets), once with 1% of a kind's ranking as the
# threshold and once with the authors' 100,000 of 352,256 (0.283884 of a kind). The one departure, for the
# CPU: at most 128 new tokens per sentence (the authors: 1,024). Figures and summaries are copied to
# docs/figures/analysis_gemma_wmt/seed<S>/ (and its threshold_1pct/).
#   bash scripts/analysis_gemma_wmt.sh            # OUT=outputs/analysis_gemma_wmt, SEEDS="0 1" by default
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${NEFT_LAB_SHARED_DATA:-../shared/data}
OUT=${OUT:-outputs/analysis_gemma_wmt}
SEEDS=${SEEDS:-0 1}
DOCS=docs/figures/analysis_gemma_wmt
COMMON=(
  model=gemma3_270m task=wmt_zh_en
  task.data.train_dir="$DATA/wmt18-20_zh_en_train" task.data.test_dir="$DATA/wmt21_zh_en"
  task.data.max_train=160 task.data.max_val=32 task.data.max_test=100
  task.truncate_source=true task.max_prompt_tokens=96 task.max_target_tokens=64
  trainer.max_steps=40 trainer.val_check_interval=40 loader.batch_size=4 optim.lr=5e-5 budget=0.03
  eval.after=false threads=2 logger=csv
)
# the authors' statistic, per kind (the defaults, spelled out so that the script says what it measures)
AUTHORS=(
  analysis.statistic=mean_state analysis.layers=following analysis.aggregation=max_abs analysis.ranking=per_kind
  analysis.tokens=generated analysis.max_new_tokens=128 analysis.no_repeat_ngram_size=4
  analysis.bucket_scale=max_score "analysis.buckets=[0,1,3,10,30,50,70,90,97,99,100]"
)
copy() {  # an analysis folder's figures and JSON summaries (not the per-vector tables) into the docs
  mkdir -p "$2"
  cp "$1"/figures/*.png "$1/analysis.json" "$1/overlap.json" "$2/"
  for f in "$1"/compare/*.json; do cp "$f" "$2/compare_$(basename "$f")"; done
  for f in "$1"/utilization/*.json; do cp "$f" "$2/utilization_$(basename "$f")"; done
}
FIRST=""
for SEED in $SEEDS; do
  RUNS="$OUT/seed$SEED"
  time python -m neft_lab "${COMMON[@]}" seed="$SEED" strategy=neft selection.reference.keep=full \
    hydra.run.dir="$RUNS/neft"   # + the full reference run, its whole model kept (the default keeps the scored matrices)
  time python -m neft_lab "${COMMON[@]}" seed="$SEED" strategy=random_neuron hydra.run.dir="$RUNS/random"
  # the reference run's folder, as the NeFT run's log names it (run now, or found in the cache)
  FULL=$(grep -h -o -E "(reference run dir: |neuron scores from cache: ).*" "$RUNS"/neft/*.log | tail -1 |
    sed -E 's/^(reference run dir: |neuron scores from cache: )//; s#/scores.safetensors$#/reference#')
  # the same 100 test sentences for every seed (the analysis's own seed stays 0: it only picks validation data)
  ANALYZE=(stage=analyze "analysis.runs=[$RUNS/neft,$FULL,$RUNS/random]" analysis.max_sentences=100 "${AUTHORS[@]}"
           threads=2 logger=none)
  # the base model does not depend on the seed: its table (keyed by model and data) is reused from the first seed
  mkdir -p "$RUNS/analysis_threshold_1pct/utilization"
  if [ -n "$FIRST" ]; then cp "$FIRST"/utilization/base.* "$RUNS/analysis_threshold_1pct/utilization/"; fi
  # 1. a threshold these short runs reach, 1% of a kind's 36,864 vectors (369 ranks): measures the four models
  time python -m neft_lab "${ANALYZE[@]}" analysis.threshold=0.01 analysis.out="$RUNS/analysis_threshold_1pct"
  # 2. the authors' threshold (the default 0.283884 of a kind: 10,465 ranks): the same tables, reused; last, so
  #    each run's <run>/analysis/summary.json (read by stage=report) is against the default threshold
  mkdir -p "$RUNS/analysis" && cp -r "$RUNS/analysis_threshold_1pct/utilization" "$RUNS/analysis/"
  time python -m neft_lab "${ANALYZE[@]}" analysis.out="$RUNS/analysis"
  copy "$RUNS/analysis" "$DOCS/seed$SEED"
  copy "$RUNS/analysis_threshold_1pct" "$DOCS/seed$SEED/threshold_1pct"
  FIRST=${FIRST:-$RUNS/analysis_threshold_1pct}
done
