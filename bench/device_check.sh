#!/usr/bin/env bash
# The one prepared GPU check: every CUDA path of mlgen, at real architecture sizes, in at most 8 minutes on
# one GPU, needing nothing from outside the machine (random-weight models built from shipped configs).
#
#   bench/device_check.sh OUT         # on a CUDA machine
#   bench/device_check.sh --cpu OUT   # dry mode: the same steps at tiny sizes on CPU (CI runs it)
#
# Every figure and any failure go to OUT/device_check.json, rewritten after each step (a step's status
# ok / skip / failed, its seconds, figures, checks and, when it failed, the reason and its log's tail);
# OUT/logs/STEP.log holds each step's output. A failing step does not stop the others. Exit status: 0
# when no step failed, 1 otherwise. DEVICE_CHECK_BUDGET (seconds, default 460) bounds the whole run;
# steps that no longer fit are skipped with that reason. PYTHON picks the interpreter (default .venv).
set -u

MODE=cuda
if [[ ${1:-} == --cpu ]]; then
    MODE=cpu
    shift
fi
if [[ $# -ne 1 || ${1:-} == -* ]]; then
    echo "usage: bench/device_check.sh [--cpu] OUT_FOLDER" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "device_check: cannot create $1" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v python3)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BUDGET=${DEVICE_CHECK_BUDGET:-460}
START=$SECONDS
FIG=$OUT/figures
WORK=$OUT/work
rm -rf "$FIG" "$OUT/logs" "$WORK"
mkdir -p "$FIG" "$OUT/logs" "$WORK"

helper() { "$PY" "$ROOT/bench/device_check.py" "$@"; }
mlgen() { "$PY" -m mlgen "$@"; }

if [[ $MODE == cuda ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "device_check: no CUDA GPU here; use --cpu for the dry mode" >&2
    exit 2
fi
helper init "$OUT" "$MODE" "$BUDGET" || exit 2

# step NAME LIMIT_S COMMAND...: run COMMAND in WORK with a time limit, then record its status and figures.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    if ((left < 15)); then
        helper skip "$OUT" "$name" "out of time: the check's ${BUDGET} s budget was spent"
        return
    fi
    ((limit > left)) && limit=$left
    local started rc
    started=$(date +%s.%N)
    (cd "$WORK" && timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@") >"$OUT/logs/$name.log" 2>&1
    rc=$?
    helper record "$OUT" "$name" --rc "$rc" --started "$started" --limit "$limit"
}

# bench NAME ARGS...: `mlgen bench ARGS`, its bench.json as the step's figures.
bench() {
    local name=$1
    shift
    mlgen bench "$@" --out "$FIG/$name.json"
}

# skip_step NAME REASON
skip_step() { helper skip "$OUT" "$1" "$2"; }

printf 'zebra\nkite\n' >"$WORK/classes.txt"

# prompts_step NAME LLM: `mlgen prompts --llm LLM` on two labels (3 label sets), the stage's counts as figures.
prompts_step() {
    mlgen prompts --run "$WORK/$1" --classes "$WORK/classes.txt" --llm "$2" --prompts-per-set 2 --synonyms 1 \
        --max-new-tokens 12 &&
        helper prompts-figures "$OUT" "$1" "$WORK/$1"
}
export -f helper mlgen bench prompts_step
export PY ROOT OUT FIG WORK

step env 60 helper env "$OUT"

if [[ $MODE == cuda ]]; then
    # fp16, SDPA, the automatic batch size and VAE slicing (768 px, batch > 1); real-size CLIP for the filter.
    step generate 150 bench generate --arch sd2 --clip-arch ViT-L-14 --steps 4 --finetune-steps 0
    # One fine-tuning run of the real-size SD 2 text encoder: mixed precision, gradient checkpointing.
    step finetune 120 bench finetune --arch sd2 --clip-arch ViT-L-14 --size 768 --steps 2 \
        --images 1 --batch-size 1 --filter-images 1 --finetune-steps 2
    step gpu_tests 150 helper pytest "$OUT" gpu_tests -- -m gpu -q "$ROOT/tests"
    step tiling 90 bench tiling --arch sd2 --clip-arch ViT-B-32 --size 1152 --steps 2 --batch-size 2 --images 2 \
        --filter-images 2 --finetune-steps 0
    step compile 150 bench compile --arch sd2 --clip-arch ViT-B-32 --size 512 --steps 4 --batch-size 4 --images 8 \
        --compile --filter-images 4 --finetune-steps 0
else
    step generate 120 bench generate --model tiny --clip tiny --size 64 --steps 2 --images 2 \
        --filter-images 4 --finetune-steps 0
    step finetune 120 bench finetune --model tiny --clip tiny --size 64 --steps 2 --images 1 \
        --filter-images 1 --finetune-steps 1
    step gpu_tests 120 helper pytest "$OUT" gpu_tests -- -m gpu -q "$ROOT/tests"
    skip_step tiling "--cpu: VAE tiling is a CUDA path (configure_memory leaves CPU pipelines alone)"
    skip_step compile "--cpu: torch.compile of the UNet is checked on CUDA only (inductor's CPU build takes minutes)"
fi

step random_lm 60 helper random-lm "$WORK/random-lm" "$OUT" random_lm
step prompts_transformers 150 prompts_step prompts_transformers "$WORK/random-lm"
if [[ $MODE == cpu ]]; then
    skip_step prompts_vllm "--cpu: vLLM runs on GPUs"
elif ! "$PY" -c 'import vllm' 2>/dev/null; then
    skip_step prompts_vllm "vllm is not installed (pip install 'mlgen[vllm]' before the check: it reaches no index)"
else
    step prompts_vllm 150 prompts_step prompts_vllm "vllm:$WORK/random-lm"
fi

if [[ $MODE == cuda ]]; then
    step sdxl 150 bench sdxl --arch sdxl --steps 2 --batch-size 2 --images 2 \
        --filter-images 2 --finetune-steps 0
else
    skip_step sdxl "--cpu: the SDXL architecture is sized on CUDA only (a 2.6B-parameter UNet)"
fi

helper finish "$OUT"
