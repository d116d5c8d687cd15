#!/bin/bash
# MDU unlearning on one node with torchrun (no Slurm), one process per GPU:
#     GPUS=8 bash launchers/torchrun/unlearn.sh [key=value ...]     (extra arguments are config overrides)
# Edit CONFIG / TP / PP / INIT / OUT (or set them in the environment). MDU_DRY_RUN=1 prints the command.
set -euo pipefail
GPUS=${GPUS:-8}
CONFIG=${CONFIG:-configs/llada_8b.yaml}
# A layout `mdu-dist plan --config $CONFIG --gpus $GPUS` marks as fitting; DP = GPUS / (TP x PP).
TP=${TP:-2} PP=${PP:-1}
INIT=${INIT:-ckpt/llada-8b-tofu/model}
OUT=${OUT:-runs/torchrun-mdu}
cmd=(torchrun --standalone --nproc-per-node "$GPUS" --no-python
     mdu-dist unlearn --config "$CONFIG" --nproc "$GPUS" "parallel.tensor=$TP" "parallel.pipeline=$PP"
     "train.init=$INIT" "train.output_dir=$OUT" train.resume=auto method.name=mdu method.tau=0.5 "$@")
echo "TensorBoard: tensorboard --logdir $OUT/tensorboard"
if [[ -n ${MDU_DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
