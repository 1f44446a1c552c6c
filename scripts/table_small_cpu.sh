#!/usr/bin/env bash
# Table 2 in small, on a CPU: Gemma-3-270M, WMT zh→en (train: WMT18-20 newstest less 200 held-out pairs for
# validation; test: the first 300 segments of WMT21), seven methods with equal care, then the report with
# mean ± std over seeds, paired bootstrap p-values against NeFT 9% and the convergence curves
# (docs/results_wmt_zhen_gemma.md). Needs the `sweeps` extra (pip install -e '.[gemma,sweeps]').
#
#   bash scripts/table_small_cpu.sh                                        # the table (~5.4 CPU-hours on 2 cores)
#   MODEL=tiny TASK=embedded STEPS=4 VAL_EVERY=2 SEARCH_STEPS=2 TEST=8 VAL=8 SEEDS=0,1 PRECISION=32-true \
#       EXTRA="model.tiny.hidden_size=32" OUT=/tmp/t bash scripts/table_small_cpu.sh     # dry run, tiny model
#
# For each method, in this order: a learning-rate grid of 4 points (Optuna's grid sampler, sweeps/lr_grid.yaml)
# on the validation loss after SEARCH_STEPS steps; then SEEDS runs at the best point, each validated every
# VAL_EVERY steps up to the cap of STEPS, stopped early when the validation loss stops improving
# (callbacks=early_stopping, patience PATIENCE), evaluated from its best checkpoint by validation loss.
# Full fine-tuning runs first: its seed-i run is the reference (M_FT) of NeFT's and reverse selection's seed-i
# run (selection.reference.run; no second full fine-tune), and its seed-0 run the reference of their grids.
# Every method trains and evaluates in bf16 autocast over float32 weights and masters (PRECISION; the paper's).
#
# Rerun the same command after a kill, a reboot or a timeout: finished trials and seeds are skipped, the one in
# flight resumes from its last checkpoint (every validation), so at most VAL_EVERY steps of one job are lost.
# Knobs (environment): OUT, DATA, MODEL, TASK, METHODS (of full,neft9,random9,lora,reverse9,neft3,random3),
# SEEDS, STEPS, VAL_EVERY, PATIENCE, SEARCH_STEPS, TEST, VAL, BATCH, PRECISION, BASELINE (the report's), EXTRA;
# TASK=alpaca_ifeval trains on Alpaca and scores IFEval (scripts/table_ifeval_cpu.sh; MAX_NEW new tokens).
set -euo pipefail
OUT=${OUT:-outputs/table_small_cpu}
DATA=${DATA:-../shared/data}
MODEL=${MODEL:-gemma3_270m}
TASK=${TASK:-wmt_zh_en}
METHODS=${METHODS:-full,neft9,random9,lora,reverse9,neft3,random3}
SEEDS=${SEEDS:-0,1,2}
STEPS=${STEPS:-60}
VAL_EVERY=${VAL_EVERY:-20}
PATIENCE=${PATIENCE:-1}
SEARCH_STEPS=${SEARCH_STEPS:-12}
TEST=${TEST:-300}
VAL=${VAL:-200}
BATCH=${BATCH:-8}
PRECISION=${PRECISION:-bf16-mixed}
BASELINE=${BASELINE:-NeFT 9%}

common=(model="$MODEL" trainer=cpu "task=$TASK" "trainer.precision=$PRECISION" logger=csv
        "loader.batch_size=$BATCH" "task.data.max_test=$TEST" "task.data.val_size=$VAL" "task.data.max_val=$VAL"
        trainer.enable_progress_bar=false experiment_name=table_small_cpu)
case "$TASK" in
  embedded) common+=("task.data.embedded.n_test=$TEST") ;;
  alpaca_ifeval) common+=("task.data.train_file=$DATA/instruct_alpaca/train.jsonl"  # Table 4 in small
      "task.data.val_file=$DATA/instruct_alpaca/val.jsonl" "task.data.test_file=$DATA/ifeval/input_data.jsonl"
      "task.max_new_tokens=${MAX_NEW:-256}" task.truncate_source=true) ;;
  *) common+=("task.data.train_dir=$DATA/wmt18-20_zh_en_train" "task.data.test_dir=$DATA/wmt21_zh_en" task.truncate_source=true
             task.max_new_tokens_ratio=2) ;;  # a batch stops at 2x its longest source + 16 tokens
esac
common+=(${EXTRA:-})
search=("trainer.max_steps=$SEARCH_STEPS" "trainer.val_check_interval=$SEARCH_STEPS" eval.after=false export.enabled=false)
final=(callbacks=early_stopping "callbacks.early_stopping.patience=$PATIENCE" "trainer.max_steps=$STEPS"
       "trainer.val_check_interval=$VAL_EVERY" 'hydra.sweep.subdir=seed${seed}')

# method → its overrides, and its grid: the same ×3 log spacing for every method, placed where each usually trains
method_overrides() {
  local ref_search="selection.reference.run=$OUT/final/full/seed${SEEDS%%,*}"
  local ref_final="selection.reference.run=$OUT/final/full/seed\${seed}"
  case "$1" in
    full)     over=(strategy=full); grid="1e-5,3e-5,1e-4,3e-4" ;;
    lora)     over=(strategy=lora strategy.r=match budget=0.09); grid="1e-4,3e-4,1e-3,3e-3" ;;
    neft9)    over=(strategy=neft budget=0.09); grid="3e-5,1e-4,3e-4,1e-3" ;;
    neft3)    over=(strategy=neft budget=0.03); grid="3e-5,1e-4,3e-4,1e-3" ;;
    random9)  over=(strategy=random_neuron budget=0.09); grid="3e-5,1e-4,3e-4,1e-3" ;;
    reverse9) over=(strategy=reverse_selection budget=0.09); grid="3e-5,1e-4,3e-4,1e-3" ;;
    random3)  over=(strategy=random_neuron budget=0.03); grid="3e-5,1e-4,3e-4,1e-3" ;;  # NeFT 3%'s control
    *) echo "unknown method $1 (choose from full,neft9,random9,lora,reverse9,neft3,random3)" >&2; exit 2 ;;
  esac
  case "$1" in  # the methods scored against the full fine-tune
    neft9|neft3|reverse9) search_ref=("$ref_search"); final_ref=("$ref_final") ;;
    *) search_ref=(); final_ref=() ;;
  esac
}

started=$(date +%s)
for method in ${METHODS//,/ }; do
  method_overrides "$method"
  echo "== $method: learning-rate grid {$grid} ($SEARCH_STEPS steps each) =="
  python -m neft_lab -m --config-dir sweeps --config-name lr_grid "${common[@]}" "${over[@]}" \
      ${search_ref[@]+"${search_ref[@]}"} "${search[@]}" "optim.lr=choice($grid)" "hydra.sweep.dir=$OUT/search/$method"
  best=$(python -m neft_lab.lr_search "$OUT/search/$method")   # e.g. optim.lr=0.0001
  echo "== $method: seeds $SEEDS at $best (up to $STEPS steps) =="
  seeds=$SEEDS
  if [ "$method" = full ]; then  # the zero-shot score (greedy decoding: the same for every seed), with the first seed
    # shellcheck disable=SC2086  # $best is one or more overrides
    python -m neft_lab -m "${common[@]}" "${over[@]}" "${final[@]}" eval.before=true "seed=${SEEDS%%,*}" $best \
        "hydra.sweep.dir=$OUT/final/$method"
    seeds=$([ "$SEEDS" = "${SEEDS#*,}" ] && echo "" || echo "${SEEDS#*,}")
  fi
  # shellcheck disable=SC2086  # $best is one or more overrides
  [ -z "$seeds" ] || python -m neft_lab -m "${common[@]}" "${over[@]}" ${final_ref[@]+"${final_ref[@]}"} "${final[@]}" \
      "seed=$seeds" $best "hydra.sweep.dir=$OUT/final/$method"
done
echo "table_small_cpu: $(( ($(date +%s) - started) / 60 )) min in this invocation"
python -m neft_lab stage=report "report.dir=$OUT/final" "report.baseline=$BASELINE"
