#!/usr/bin/env bash
# One short session on a lent CUDA machine: train the tiny model, then the GPU benchmarks.
#
#   bash bench/gpu_session.sh OUTDIR [TRAIN_MINUTES] [BUDGET_SECONDS]
#
# Every phase is capped so the whole script ends inside BUDGET_SECONDS (default 570);
# logs and the trained checkpoint land in OUTDIR as each phase ends. The reference
# package and pycocotools (for the side-by-side benchmarks) are installed from ./.whl
# when it is there (git-ignored), for a machine with no package index:
#   pip download --no-deps -d .whl segment_anything==1.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl pycocotools
set -u
OUTDIR=${1:?usage: gpu_session.sh OUTDIR [TRAIN_MINUTES] [BUDGET_SECONDS]}
MINUTES=${2:-4.5}
BUDGET=${3:-570}
mkdir -p "$OUTDIR"
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
    echo "== $name exit ${PIPESTATUS[0]} at ${SECONDS}s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUTDIR/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
$PY -c "import torch, segment_anything; print('torch', torch.__version__, torch.cuda.get_device_name())"

mkdir -p /tmp/train
phase train $(( ${MINUTES%.*} * 60 + 120 )) \
    $PY -m sam.train --out /tmp/train/sam_tiny.pth --init sam/weights/sam_tiny.pth \
    --device "${DEVICE:-cuda}" --seed 1 --steps 100000 --batch "${BATCH:-32}" --prompts 32 --workers "${WORKERS:-14}" \
    --lr 6e-4 --warmup 50 --max-minutes "$MINUTES" --save-every 100 --log-every 25 \
    --no-progress
cp /tmp/train/sam_tiny.pth /tmp/train/sam_tiny.json "$OUTDIR"/ 2>/dev/null

phase amg 170 $PY -m bench.amg --models vit_h vit_b --images 2 --size 1500 2250
phase predictor 120 $PY -m bench.predictor --models tiny --repeat 2
echo "== done at ${SECONDS}s"
