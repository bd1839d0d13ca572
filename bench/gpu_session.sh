#!/usr/bin/env bash
# One short session on a lent CUDA machine: the CUDA parity tests, the GPU benchmarks and
# a training stage of the tiny model, each phase capped in time.
#
#   [PHASES="tests amg amg_tiny train predictor"] bash bench/gpu_session.sh OUTDIR [TRAIN_MINUTES] [BUDGET_SECONDS]
#
# PHASES picks and orders the phases (default: all, as above); PROFILE=ROWS adds the top
# operators of one bf16 generate to the amg phases; VIT_H_CHECKPOINT=PATH (e.g. the official
# sam_vit_h_4b8939.pth) makes the amg phase time vit_h with those weights instead of the
# ViTs' seeded random ones. Every phase is capped so
# the whole script ends inside BUDGET_SECONDS (default 570); training gets what the
# phases after it leave, at most TRAIN_MINUTES. Logs, the trained checkpoint and each
# phase's exit status (OUTDIR/session.txt) land in OUTDIR as each phase ends. The
# reference package and pycocotools (for the parity tests and side-by-side benchmarks)
# are installed from ./.whl (git-ignored: carry it to the machine), for a machine with no
# package index; the script stops when they cannot be imported:
#   pip download --no-deps -d .whl segment_anything==1.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl pycocotools
set -uo pipefail  # a failing import check is not hidden by its tee
OUTDIR=${1:?usage: gpu_session.sh OUTDIR [TRAIN_MINUTES] [BUDGET_SECONDS]}
MINUTES=${2:-4.5}
BUDGET=${3:-570}
PHASES=" ${PHASES:-tests amg amg_tiny train predictor} "
# the training stage: INIT, SEED, BATCH, PROMPTS, WORKERS, LR, WARMUP, TARGET_SCALE and DATA (prompt
# sampling, sam.train --data; default stages 9 and 10's) override its arguments
DATA=${DATA:-'{"hard_weight": 2.0, "weighted_prompts": 1, "p_centre_point": 0.3, "point_offset": 0.0}'}
declare -A CAP=([tests]=90 [amg]=150 [amg_tiny]=90 [predictor]=90)
AFTER=0  # seconds the phases after training may take
seen_train=0
for p in $PHASES; do
    if [ "$p" = train ]; then seen_train=1; elif ((seen_train)); then AFTER=$((AFTER + ${CAP[$p]:-0})); fi
done
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
    echo "== $name exit ${PIPESTATUS[0]} at ${SECONDS}s" | tee -a "$OUTDIR/session.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee -a "$OUTDIR/session.txt"
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

train() {
    rm -rf /tmp/train  # nothing from an earlier run on a warm machine passes for this one's
    mkdir -p /tmp/train
    # what the budget leaves after this phase's start-up (~60 s) and the phases after it
    local minutes
    minutes=$(python3 -c "print(round(min($MINUTES, ($BUDGET - $SECONDS - $AFTER - 60) / 60), 2))")
    if python3 -c "import sys; sys.exit(not $minutes >= 1)"; then
        phase train $(python3 -c "print(int($minutes * 60 + 60))") \
            $PY -m sam.train --out /tmp/train/sam_tiny.pth --init "${INIT:-sam/weights/sam_tiny.pth}" \
            --device "${DEVICE:-cuda}" --seed "${SEED:-10}" --steps 100000 --batch "${BATCH:-32}" \
            --prompts "${PROMPTS:-32}" --workers "${WORKERS:-14}" --lr "${LR:-6e-4}" --warmup "${WARMUP:-50}" \
            --target-scale "${TARGET_SCALE:-2}" \
            --max-minutes "$minutes" --save-every 100 --log-every 25 --data "$DATA" --no-progress
    else
        echo "== train skipped: ${minutes} min left" | tee -a "$OUTDIR/session.txt"
    fi
    if [ -f /tmp/train/sam_tiny.json ]; then  # written only when training ended cleanly
        cp /tmp/train/sam_tiny.pth /tmp/train/sam_tiny.json "$OUTDIR"/
    elif [ -f /tmp/train/sam_tiny.pth ]; then  # killed: the last periodic save, marked so
        cp /tmp/train/sam_tiny.pth "$OUTDIR"/sam_tiny.partial.pth
    fi
}

for p in $PHASES; do
    case $p in
    # the generator's parity tests with both models on the GPU
    tests) SAM_TEST_DEVICE=cuda phase tests "${CAP[tests]}" $PY -m pytest -q -p no:cacheprovider \
        tests/sam/test_amg.py tests/sam/test_precision.py ;;
    train) train ;;
    # the ViTs (seeded random weights, or vit_h from VIT_H_CHECKPOINT) at the default
    # preset, 1500x2250 as in the target
    amg) if [ -n "${VIT_H_CHECKPOINT:-}" ]; then AMG_MODELS=(vit_h --checkpoint "$VIT_H_CHECKPOINT")
         else AMG_MODELS=(vit_h vit_b); fi
         phase amg "${CAP[amg]}" $PY -m bench.amg --models "${AMG_MODELS[@]}" --images 2 \
        --size 1500 2250 --profile "${PROFILE:-0}" ;;
    # the trained tiny model at its preset, where it keeps many masks: filtering, NMS and
    # RLE run on CUDA
    amg_tiny) phase amg_tiny "${CAP[amg_tiny]}" $PY -m bench.amg --models tiny --images 2 \
        --size 1500 2250 --preset tiny --profile "${PROFILE:-0}" ;;
    predictor) phase predictor "${CAP[predictor]}" $PY -m bench.predictor --models \
        --gpu-models tiny vit_b vit_h --repeat 3 ;;
    *) echo "== unknown phase $p" | tee -a "$OUTDIR/session.txt" ;;
    esac
done
echo "== done at ${SECONDS}s" | tee -a "$OUTDIR/session.txt"
