#!/usr/bin/env bash
# Fair comparisons need tuned learning rates: for each method an Optuna study of optim.lr (log-uniform) on the
# validation loss (sweeps/lr_search.yaml, TRIALS trials), then the final seeds at its best lr, then the report,
# whose lr column names the value each method used. Needs the `sweeps` extra (pip install -e '.[sweeps]').
#
#   DATA=../shared/data OUT=outputs/lr_small bash scripts/lr_search.sh                      # Gemma-3-270M, WMT zh→en, CUDA GPU
#   MODEL=tiny TASK=embedded TRAINER=cpu STEPS=4 TRIALS=3 SEEDS=0 TEST=4 \
#       EXTRA="experiment=smoke logger=none eval.before=false" bash scripts/lr_search.sh      # CPU dry run, ~2 min
#
# Knobs (environment): METHODS (comma-separated strategies; NeFT-like ones at BUDGET, LoRA at the matched rank),
# MODEL, TASK, DATA, OUT, STEPS, TEST (test sentences), TRIALS (per method), SEEDS (final runs), TRAINER, BATCH,
# LAUNCHER (slurm|local|parallel: trials and seeds as parallel jobs; PARALLEL trials per Optuna batch), EXTRA.
# Rerunning the script continues where it stopped: the studies are seeded, so finished trials and seeds are skipped.
set -euo pipefail
METHODS=${METHODS:-full,lora,neft}
MODEL=${MODEL:-gemma3_270m}
TASK=${TASK:-wmt_zh_en}
DATA=${DATA:-../shared/data}
OUT=${OUT:-outputs/lr_search}
STEPS=${STEPS:-600}
TEST=${TEST:-500}
TRIALS=${TRIALS:-12}
SEEDS=${SEEDS:-0,1,2}
TRAINER=${TRAINER:-gpu}
BATCH=${BATCH:-16}
BUDGET=${BUDGET:-0.09}

# A GPU trainer where no CUDA GPU is visible fails every trial alike: say so once, before the first one.
if [[ "$TRAINER" == gpu ]] \
    && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "lr_search.sh: TRAINER=$TRAINER but no CUDA GPU is visible on this machine: run it where one is, or on CPU with TRAINER=cpu (e.g. the tiny dry run at the top of scripts/lr_search.sh)" >&2
  exit 2
fi

common=(model="$MODEL" trainer="$TRAINER" "task=$TASK" "trainer.max_steps=$STEPS"
        "trainer.val_check_interval=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" "loader.batch_size=$BATCH")
if [ "$TASK" != embedded ]; then
  common+=("task.data.train_dir=$DATA/wmt18-20_zh_en_train" "task.data.test_dir=$DATA/wmt21_zh_en"
           "task.data.max_test=$TEST" task.truncate_source=true)
else
  common+=("task.data.embedded.n_test=$TEST")
fi
common+=(${EXTRA:-})
launcher=()
case "${LAUNCHER:-}" in
  "") ;;
  parallel) launcher=(hydra/launcher=parallel "hydra.launcher.n_jobs=${PARALLEL:-2}") ;;
  *) launcher=("hydra/launcher=$LAUNCHER") ;;
esac

for method in ${METHODS//,/ }; do
  case "$method" in
    lora) chosen=(strategy=lora strategy.r=match "budget=$BUDGET") ;;
    neft|random_neuron|reverse_selection) chosen=("strategy=$method" "budget=$BUDGET") ;;
    *) chosen=("strategy=$method") ;;
  esac
  python -m neft_lab -m --config-dir sweeps --config-name lr_search "${common[@]}" "${chosen[@]}" \
      ${launcher[@]+"${launcher[@]}"} "hydra.sweeper.n_trials=$TRIALS" "hydra.sweeper.n_jobs=${PARALLEL:-1}" \
      "hydra.sweep.dir=$OUT/search/$method"
  best=$(python -m neft_lab.lr_search "$OUT/search/$method")   # e.g. optim.lr=0.000213
  echo "$method: $best"
  # shellcheck disable=SC2086  # $best is one or more overrides
  python -m neft_lab -m "${common[@]}" "${chosen[@]}" ${launcher[@]+"${launcher[@]}"} "seed=$SEEDS" $best \
      "hydra.sweep.dir=$OUT/final/$method"
done
python -m neft_lab stage=report "report.dir=$OUT/final"
