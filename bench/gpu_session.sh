#!/usr/bin/env bash
# One short session on a lent CUDA machine: train the tiny model, then the GPU benchmarks.
#
#   bash bench/gpu_session.sh OUTDIR [TRAIN_MINUTES] [BUDGET_SECONDS]
#   TRAIN_MINUTES 0: benchmarks only; BENCH=0 bash bench/gpu_session.sh ...: training only
#
# Every phase is capped so the whole script ends inside BUDGET_SECONDS (default 570);
# training gets at most what the benchmarks leave (about 330 s). Logs, the trained
# checkpoint and each phase's exit status (OUTDIR/session.txt) land in OUTDIR as each
# phase ends. The reference package and pycocotools (for the side-by-side benchmarks)
# are installed from ./.whl (git-ignored: carry it to the machine), for a machine with no
# package index; the script stops before training when they cannot be imported:
#   pip download --no-deps -d .whl segment_anything==1.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl pycocotools
set -uo pipefail  # a failing import check is not hidden by its tee
OUTDIR=${1:?usage: gpu_session.sh OUTDIR [TRAIN_MINUTES] [BUDGET_SECONDS]}
MINUTES=${2:-4.5}
BUDGET=${3:-570}
BENCH=${BENCH:-1}  # BENCH=0: training only
# prompt sampling of the training stage (sam.train --data): stage 9's
DATA=${DATA:-'{"hard_weight": 2.0, "weighted_prompts": 1, "p_centre_point": 0.3, "point_offset": 0.0}'}
BENCH_SECONDS=$((BENCH ? 330 : 0))  # amg (ViTs, tiny) and predictor phases
mkdir -p "$OUTDIR"
# training time: what the budget leaves after start-up (~40 s) and the benchmarks
MAX_MINUTES=$(python3 -c "print(round(max(0.5, min($MINUTES, ($BUDGET - $BENCH_SECONDS - 100) / 60)), 2))")
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

left() { echo $((BUDGET - SECONDS)); }
phase() {  # phase NAME CAP_SECONDS CMD...: run CMD for at most min(CAP, time left)
    local name=$1 cap=$2
    shift 2
    local t
    t=$(left)
    ((t > cap)) && t=$cap
    if ((t < 20)); then
        echo "== $name skipped: ${t}s left"
        return
    fi
    echo "== $name (at most ${t}s, ${SECONDS}s elapsed)"
    timeout -k 5 "$t" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    echo "== $name exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$OUTDIR/session.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUTDIR/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl ||
        echo "== pip install from .whl failed" | tee -a "$OUTDIR/session.txt"
fi
if ! $PY -c "import torch, segment_anything, pycocotools.mask
print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUTDIR/session.txt"; then
    echo "== segment_anything / pycocotools missing: carry .whl (see the top of this script)" |
        tee -a "$OUTDIR/session.txt"
    exit 2
fi

rm -rf /tmp/train  # nothing from an earlier run on a warm machine passes for this one's
mkdir -p /tmp/train
[ "$MINUTES" = 0 ] || phase train $(python3 -c "print(int($MAX_MINUTES * 60 + 60))") \
    $PY -m sam.train --out /tmp/train/sam_tiny.pth --init sam/weights/sam_tiny.pth \
    --device "${DEVICE:-cuda}" --seed 1 --steps 100000 --batch "${BATCH:-32}" --prompts 32 --workers "${WORKERS:-14}" \
    --lr 6e-4 --warmup 50 --max-minutes "$MAX_MINUTES" --save-every 100 --log-every 25 \
    --data "$DATA" --no-progress
if [ -f /tmp/train/sam_tiny.json ]; then  # written only when training ended cleanly
    cp /tmp/train/sam_tiny.pth /tmp/train/sam_tiny.json "$OUTDIR"/
elif [ -f /tmp/train/sam_tiny.pth ]; then  # killed: the last periodic save, marked so
    cp /tmp/train/sam_tiny.pth "$OUTDIR"/sam_tiny.partial.pth
fi
[ "$BENCH" = 1 ] || { echo "== done at ${SECONDS}s" | tee -a "$OUTDIR/session.txt"; exit 0; }

# the ViTs (seeded random weights) at the default preset; the trained tiny model at the
# relaxed thresholds, where it keeps dozens of masks: filtering, NMS and RLE run on CUDA
phase amg 150 $PY -m bench.amg --models vit_h vit_b --images 2 --size 1500 2250
phase amg_tiny 60 $PY -m bench.amg --models tiny --images 2 --size 1500 2250 \
    --pred-iou-thresh 0.3 --stability-score-thresh 0.6
phase predictor 120 $PY -m bench.predictor --models tiny --repeat 2
echo "== done at ${SECONDS}s" | tee -a "$OUTDIR/session.txt"
