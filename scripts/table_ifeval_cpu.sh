#!/usr/bin/env bash
# Table 4 in small, on a CPU: Gemma-3-270M trained on Alpaca (4,500 train / 500 validation records), scored on
# IFEval (strict / loose, prompt / instruction level) — full fine-tuning, NeFT 9%, LoRA at the matched rank and
# random neurons 9%, 2 seeds, each with its learning-rate grid; the same machinery, resumability and report
# (paired bootstrap over prompts against NeFT 9%) as scripts/table_small_cpu.sh, which this runs.
# Needs the `ifeval` and `sweeps` extras (pip install -e '.[gemma,sweeps,ifeval]'); docs/results_ifeval_gemma.md.
#
#   bash scripts/table_ifeval_cpu.sh                     # TEST IFEval prompts (default 100), MAX_NEW tokens (256)
#
# Sized to ~3 CPU-hours on 2 cores (benchmarks/table_cpu_speed.py --task alpaca_ifeval): Alpaca batches are about
# twice as long as WMT's, so batches group examples of similar length (loader.group_by_length=true: 1.47x faster
# steps, the same for every method) and validation uses VAL=100 of Alpaca's 500 held-out records.
set -euo pipefail
export TASK=alpaca_ifeval
export OUT=${OUT:-outputs/table_ifeval_cpu}
export METHODS=${METHODS:-full,neft9,lora,random9}
export SEEDS=${SEEDS:-0,1}
export VAL=${VAL:-100}
export EXTRA="loader.group_by_length=true ${EXTRA:-}"
export TEST=${TEST:-100}
export MAX_NEW=${MAX_NEW:-256}
exec bash "$(dirname "$0")/table_small_cpu.sh"
