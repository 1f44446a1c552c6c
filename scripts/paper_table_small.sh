#!/usr/bin/env bash
# The paper's Table 2 in small: Gemma-3-270M on WMT zh→en and en→zh (train: WMT18-20 newstest, test: WMT21),
# full fine-tuning, LoRA at the matched rank, NeFT 3/6/9/12 %, random 9 %, reverse 9 %, FT-embed, FT-{in,out},
# two seeds, with the paper's optimizer settings (the defaults: docs/fidelity.md); then the report.
#
#   DATA=../shared/data OUT=outputs/paper_small bash scripts/paper_table_small.sh        # on a CUDA GPU
#   MODEL=tiny STEPS=4 REF_STEPS=4 TEST=4 BATCH=4 TRAINER=cpu EXTRA=threads=1 bash scripts/paper_table_small.sh  # CPU dry run
#
# Knobs (environment): MODEL (a conf/model option), DATA, OUT, STEPS (training steps), REF_STEPS (reference fine-tune), TEST (test sentences),
# SEEDS, TRAINER (gpu|cpu), BATCH, LR, LORA_LR, EXTRA (more overrides, e.g. "threads=1"). Writes $OUT/report/table.md, table.csv and budget_vs_score.png.
#
# Launchers (the `sweeps` extra, pip install -e '.[sweeps]'): every command below is a Hydra sweep, and LAUNCHER fans
# its jobs out without changing anything else:
#   LAUNCHER=slurm PARTITION=gpu bash scripts/paper_table_small.sh      # each job a SLURM job (submitit job arrays;
#       GPUS (1) per job, TIME_MIN (1440) limit, ARRAY (32) at once; GPUS>1 also TRAINER=ddp EXTRA=trainer.devices=$GPUS)
#   LAUNCHER=local bash scripts/paper_table_small.sh                     # each job a process on this machine, all at once
#   LAUNCHER=parallel JOBS=4 EXTRA=threads=4 bash scripts/paper_table_small.sh   # JOBS at a time on this machine
# The sweep folders are fixed ($OUT/<name>): run the script again after a crash, a preemption or a failed job, and
# finished jobs are skipped, interrupted ones resume from their checkpoints; each sweep ends with its summary line
# "sweep: N jobs: a skipped, b resumed, c run, d failed" (and exits 1 if a job failed: fix it and run again).
set -euo pipefail
MODEL=${MODEL:-gemma3_270m}
DATA=${DATA:-../shared/data}
OUT=${OUT:-outputs/paper_small}
STEPS=${STEPS:-600}
REF_STEPS=${REF_STEPS:-$STEPS}   # the paper's M_FT runs as long as the NeFT run
TEST=${TEST:-500}
SEEDS=${SEEDS:-0,1}
TRAINER=${TRAINER:-gpu}
BATCH=${BATCH:-16}
LR=${LR:-2e-5}
LORA_LR=${LORA_LR:-2e-4}
launcher=()
case "${LAUNCHER:-}" in
  "") ;;  # Hydra's basic launcher: one job after another in this process
  slurm) launcher=(hydra/launcher=slurm "hydra.launcher.partition=${PARTITION:-null}" "hydra.launcher.gpus_per_node=${GPUS:-1}"
                   "hydra.launcher.timeout_min=${TIME_MIN:-1440}" "hydra.launcher.array_parallelism=${ARRAY:-32}") ;;
  parallel) launcher=(hydra/launcher=parallel "hydra.launcher.n_jobs=${JOBS:-2}") ;;
  *) launcher=("hydra/launcher=$LAUNCHER") ;;
esac

common=(
  model="$MODEL" trainer="$TRAINER" logger=csv "seed=$SEEDS" task=wmt_zh_en,wmt_en_zh
  "task.data.train_dir=$DATA/wmt18-20_zh_en_train" "task.data.test_dir=$DATA/wmt21_zh_en"
  "task.data.max_test=$TEST" task.truncate_source=true "trainer.max_steps=$STEPS"
  "trainer.val_check_interval=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))" "loader.batch_size=$BATCH"
  "++selection.reference.steps=$REF_STEPS" "++selection.reference.lr=$LR" "++selection.reference.batch_size=$BATCH"
  experiment_name=paper_small ${EXTRA:-}
)
python -m neft_lab -m "${common[@]}" ${launcher[@]+"${launcher[@]}"} strategy=full "optim.lr=$LR" "hydra.sweep.dir=$OUT/full"
python -m neft_lab -m "${common[@]}" ${launcher[@]+"${launcher[@]}"} strategy=lora strategy.r=match budget=0.09 "optim.lr=$LORA_LR" "hydra.sweep.dir=$OUT/lora"
python -m neft_lab -m "${common[@]}" ${launcher[@]+"${launcher[@]}"} strategy=neft budget=0.03,0.06,0.09,0.12 "optim.lr=$LR" "hydra.sweep.dir=$OUT/neft"
python -m neft_lab -m "${common[@]}" ${launcher[@]+"${launcher[@]}"} strategy=random_neuron,reverse_selection budget=0.09 "optim.lr=$LR" "hydra.sweep.dir=$OUT/controls"
python -m neft_lab -m "${common[@]}" ${launcher[@]+"${launcher[@]}"} strategy=ft_embed,ft_in_out "optim.lr=$LR" "hydra.sweep.dir=$OUT/dense_baselines"
python -m neft_lab stage=report "report.dir=$OUT"
