#!/usr/bin/env bash
# shellcheck disable=SC2329  # the part functions run under `timeout` as `gpu_check.sh --fn NAME`
# One command for a GPU: every check of the GPU paths that a CPU cannot run, within a fixed wall budget.
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # default: $OUT, else runs/gpu_check
#   bash scripts/gpu_check.sh --download-wheels DIR # here (pip works): the wheels a bare GPU box lacks
#
# Parts, each under its own `timeout` (cut to what is left of GPU_CHECK_BUDGET_S, default 480 s); a part
# that fails or times out does not stop the others:
#   setup           install the wheels of GPU_CHECK_WHEELS (--no-index --no-deps, into a private
#                   --target dir put first on PYTHONPATH) and lay this checkout's package there (links),
#                   unless this checkout is the tempo_mega that imports already
#   env             scripts/check_env.py: versions, the card, which features work here
#   compile_kernels scripts/compile_kernels.py, where this checkout has it
#   kernel_tests    the `gpu`-marked kernel tests at real shapes (tests/unit/test_kernels_*.py) and the
#                   trainer offload on CUDA (tests/integration/test_offload.py)
#   bench_kernels   scripts/bench_kernels.py --csv (peak bandwidth from the card's name)
#   train_torch     scripts/bench_train_step.py --backends torch: the torch backend's train step
#   train_megatron  scripts/bench_train_step.py --backends megatron --spec local (megatron-core's local
#                   layer spec; skipped when megatron-core does not import, e.g. its wheel was not carried)
#   tempo_debug     tempo-mega train experiment=debug_cpu trainer.device=cuda, 2 steps
# Both train parts run Qwen3-8B-shaped layers, reduced: GPU_CHECK_LAYERS (4 of 36) layers,
# GPU_CHECK_SEQS (2) sequences of GPU_CHECK_SEQ_LEN (4096) tokens; megatron's local spec materializes the
# [heads, s, s] attention scores, which 16K-token sequences would not fit.
#
# Without CUDA the parts that need it are reported "skipped", never passed, and the others run at toy
# shapes (GPU_CHECK_CPU=1 forces this on a GPU machine); the CPU test suite runs it so. A part left no
# time by the budget is "not_run".
# OUT_DIR gets at most 8 files (what a lent machine hands back): summary.md and summary.csv (part,
# status, rc, seconds, note), env.txt, gpu_check.log (every part's output), bench_kernels.csv,
# train_torch.csv, train_megatron.csv, tempo_debug_metrics.jsonl. Exit status 1 if any part failed,
# timed out or was not run, else 0 (skipped parts, which cannot run here, do not fail it).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF=$ROOT/scripts/gpu_check.sh
PY=${PYTHON:-python3}
WHEEL_PLATFORMS=(manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64
                 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
                 manylinux2014_x86_64 manylinux1_x86_64)
# what this package needs beyond a torch + transformers + Triton image (pure Python but megatron-core),
# with megatron-core's own needs (psutil is in such images); versions as tested on CPU
GPU_WHEELS=(megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1 math-verify==0.9.0
            latex2sympy2_extended==1.11.0)
# pure Python, published as a source archive only (omegaconf pins it): built into a wheel here
GPU_SDISTS=(antlr4-python3-runtime==4.9.3)

# ------------------------------------------------------------------------------------------ parts run as
# `gpu_check.sh --fn NAME` (under timeout); they read the exported PY ROOT OUT_DIR SCRATCH HAVE_CUDA
setup() {
    local site=$SCRATCH/site
    mkdir -p "$site"
    if [[ -n ${GPU_CHECK_WHEELS:-} ]]; then
        shopt -s nullglob
        local wheels=("$GPU_CHECK_WHEELS"/*.whl)
        shopt -u nullglob
        if ((${#wheels[@]} == 0)); then
            echo "GPU_CHECK_WHEELS=$GPU_CHECK_WHEELS holds no .whl file" >&2
            return 1
        fi
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
            "${wheels[@]}" || return 1
    fi
    # this checkout, unless it is the tempo_mega that imports (an editable install of it): its package
    # layout (kernels/ and configs/ as tempo_mega.kernels and tempo_mega.configs) made of links, no build
    if ! PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$PY" -P -c \
        "import os, sys, tempo_mega; sys.exit(not os.path.realpath(tempo_mega.__file__).startswith('$ROOT/'))" \
        2>/dev/null; then
        mkdir -p "$site/tempo_mega" || return 1
        local entry
        for entry in "$ROOT"/tempo_mega/*; do
            ln -sfn "$entry" "$site/tempo_mega/$(basename "$entry")" || return 1
        done
        ln -sfn "$ROOT/kernels" "$site/tempo_mega/kernels" && ln -sfn "$ROOT/configs" "$site/tempo_mega/configs" \
            || return 1
        PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$PY" -P -c \
            "import tempo_mega.kernels, tempo_mega.configs, tempo_mega.cli; print('tempo_mega from', '$ROOT')"
    fi
}

env_report() {
    "$PY" "$ROOT/scripts/check_env.py" >"$OUT_DIR/env.txt" 2>&1
    local rc=$?
    cat "$OUT_DIR/env.txt"
    return "$rc"
}

tempo_debug() {
    local dir=$SCRATCH/tempo_debug device=cpu steps=1
    [[ $HAVE_CUDA == 1 ]] && device=cuda steps=2
    "$PY" -m tempo_mega.cli train experiment=debug_cpu trainer.device="$device" trainer.total_steps="$steps" \
        trainer.output_dir="$dir" || return
    cp "$dir/metrics.jsonl" "$OUT_DIR/tempo_debug_metrics.jsonl"
}

if [[ ${1:-} == --fn ]]; then
    "$2"
    exit
fi

if [[ ${1:-} == --download-wheels ]]; then
    dest=${2:?usage: gpu_check.sh --download-wheels DIR}
    mkdir -p "$dest" || exit
    plat=()
    for p in "${WHEEL_PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}" \
        --implementation cp "${plat[@]}" -d "$dest" "${GPU_WHEELS[@]}" || exit
    "$PY" -m pip wheel --quiet --no-deps -w "$dest" "${GPU_SDISTS[@]}" || exit
    ls -l "$dest"
    exit
fi

OUT_DIR=${1:-${OUT:-$ROOT/runs/gpu_check}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
START_S=$(date +%s)
DEADLINE_S=$((START_S + BUDGET_S))
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
LOG=$OUT_DIR/gpu_check.log
SUMMARY_ROWS=$SCRATCH/summary.rows
: >"$LOG"
: >"$SUMMARY_ROWS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

say() { echo "gpu_check: $*" | tee -a "$LOG"; }

# record PART STATUS RC SECONDS NOTE
record() {
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$SUMMARY_ROWS"
    say "$1: $2 (rc $3, $4 s)${5:+: $5}"
}

# part NAME LIMIT_S NEEDS(cuda|any) CMD...: CMD under `timeout`, output to the log and stdout
part() {
    local name=$1 limit=$2 needs=$3
    shift 3
    if [[ $needs == cuda && $HAVE_CUDA != 1 ]]; then
        record "$name" skipped - 0 "needs CUDA (${NO_CUDA_WHY})"
        return
    fi
    local left=$((DEADLINE_S - $(date +%s)))
    if ((left < 10)); then
        record "$name" not_run - 0 "no time left of the ${BUDGET_S} s budget"
        return
    fi
    ((limit > left)) && limit=$left
    echo "===== $name (timeout ${limit} s): $*" | tee -a "$LOG"
    local t0 t1 rc status
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    case $rc in
        0) status=passed ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" \
        "$([[ $status == timeout ]] && echo "over its ${limit} s")"
}

skip() { record "$1" skipped - 0 "$2"; }

PYTHONPATH_BEFORE=${PYTHONPATH:-}
export PY ROOT OUT_DIR SCRATCH
part setup 120 any bash "$SELF" --fn setup
export PYTHONPATH=$SCRATCH/site${PYTHONPATH_BEFORE:+:$PYTHONPATH_BEFORE}

HAVE_CUDA=0
NO_CUDA_WHY="torch sees no CUDA device"
if [[ ${GPU_CHECK_CPU:-0} == 1 ]]; then
    NO_CUDA_WHY="GPU_CHECK_CPU=1"
elif "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    HAVE_CUDA=1
fi
if [[ $HAVE_CUDA == 1 ]]; then
    CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null)
    say "card: $CARD"
else
    CARD=none
    export CUDA_VISIBLE_DEVICES=""  # GPU_CHECK_CPU=1 on a GPU machine: nothing may find the card
    say "no CUDA ($NO_CUDA_WHY): GPU parts skipped, the others at toy shapes"
fi

# ------------------------------------------------------------------------------------------ parts
export HAVE_CUDA
part env 60 any bash "$SELF" --fn env_report

if [[ -f $ROOT/scripts/compile_kernels.py ]]; then
    part compile_kernels 60 cuda "$PY" "$ROOT/scripts/compile_kernels.py"
else
    skip compile_kernels "scripts/compile_kernels.py is not in this checkout"
fi

part kernel_tests 120 cuda "$PY" -P -m pytest -q -p no:cacheprovider -m gpu -rs \
    "$ROOT"/tests/unit/test_kernels_logprob.py "$ROOT"/tests/unit/test_kernels_value_head.py \
    "$ROOT"/tests/unit/test_kernels_seq_losses.py "$ROOT"/tests/integration/test_offload.py

if [[ $HAVE_CUDA == 1 ]]; then
    peak_args=()
    case $CARD in
        *H100*PCIe*) peak_args=(--peak-gbps 2000) ;;  # the others: bench_kernels.py --card from the name
    esac
    part bench_kernels 120 cuda "$PY" "$ROOT/scripts/bench_kernels.py" --csv "$OUT_DIR/bench_kernels.csv" \
        "${peak_args[@]}"
else  # the script's wiring at toy shapes, in Triton's interpreter: no timings
    part bench_kernels 60 any env TRITON_INTERPRET=1 "$PY" "$ROOT/scripts/bench_kernels.py" --check
fi

if [[ $HAVE_CUDA == 1 ]]; then
    shape=(--layers "${GPU_CHECK_LAYERS:-4}" --seq-len "${GPU_CHECK_SEQ_LEN:-4096}" --prompt-len 256
           --seqs "${GPU_CHECK_SEQS:-2}" --steps 3 --warmup 1)
else
    shape=(--device cpu --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --head-dim 16 --vocab 256
           --layers 1 --seq-len 16 --prompt-len 4 --seqs 1 --steps 1 --warmup 0)
fi
train=("$PY" "$ROOT/scripts/bench_train_step.py" "${shape[@]}" --precision bf16 --value-steps 0)
part train_torch 90 any "${train[@]}" --backends torch --csv "$OUT_DIR/train_torch.csv"
if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
    skip train_megatron "megatron-core does not import (carry its wheel: GPU_CHECK_WHEELS, docs/benchmarks.md)"
else  # on CPU megatron-core's CUDA calls run only under the test suite's shim: cuda
    part train_megatron 120 cuda "${train[@]}" --backends megatron --spec local \
        --csv "$OUT_DIR/train_megatron.csv"
fi

part tempo_debug 90 any bash "$SELF" --fn tempo_debug

# ------------------------------------------------------------------------------------------ summary
failed=0
{
    echo "## gpu_check: ${CARD}, $(date -u +%Y-%m-%dT%H:%MZ), $(($(date +%s) - START_S)) s of a ${BUDGET_S} s budget"
    echo
    echo "| part | status | rc | seconds | note |"
    echo "|---|---|---:|---:|---|"
} >"$OUT_DIR/summary.md"
echo "part,status,rc,seconds,note" >"$OUT_DIR/summary.csv"
while IFS=$'\t' read -r name status rc secs note; do
    echo "| $name | $status | $rc | $secs | $note |" >>"$OUT_DIR/summary.md"
    echo "$name,$status,$rc,$secs,\"${note//\"/\'}\"" >>"$OUT_DIR/summary.csv"
    [[ $status == failed || $status == timeout || $status == not_run ]] && failed=1
done <"$SUMMARY_ROWS"
echo | tee -a "$LOG"
tee -a "$LOG" <"$OUT_DIR/summary.md"
exit "$failed"
