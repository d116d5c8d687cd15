#!/bin/bash
# The TOFU pipeline on a Slurm cluster, every job a `mdu-dist launch`, chained by job dependencies:
#   start    finetune on TOFU full (the model must know the forget set) | the retain-only twin (retain90)
#   unlearn  MDU at each tau (one job array) and the baselines (another) | evaluation of the twin
#   eval     evaluation of the finetuned model and of every unlearned one, one job array (forget quality
#            against the twin), each into its run's eval/
#   report   `mdu-dist report`: $RUNS/report/report.md, report.json, forget_vs_utility.png
# From the repository root on a login node: bash launchers/slurm/pipeline_tofu.sh
# `mdu-dist launch` checks a job's inputs (data, checkpoints) before it queues the job, so each stage after
# `start` is submitted, once the checkpoints it reads exist, by a one-CPU job (sbatch --dependency=afterok)
# that runs this script at that stage. MDU_DRY_RUN=1 bash <this file> [stage] prints a stage's commands.
set -euo pipefail

# ---------------------------------------------------------------------------------------------- edit these
CONFIG=configs/llada_8b.yaml
RUNS=runs/tofu-llada8b
INIT=ckpt/llada-8b-instruct   # the pre-trained backbone: `mdu-dist convert hf-to-dist` output (or an HF dir)
PARTITION=gpu ACCOUNT=proj
NODES=1 GPUS=8 TP=2 PP=1      # one task per GPU; a layout `mdu-dist plan --config $CONFIG` marks as fitting
TAUS=0.25,0.5,1
BASELINES=ga,graddiff,npo
FINETUNE=(train.epochs=5 optim.lr=1e-5 optim.micro_batch_size=2 optim.gradient_accumulation_steps=4)
UNLEARN=(train.epochs=5 optim.lr=1e-5 optim.micro_batch_size=2 optim.gradient_accumulation_steps=4)
# -----------------------------------------------------------------------------------------------------------

SLURM=(--executor slurm --partition "$PARTITION" --account "$ACCOUNT" --cpus-per-task 12 --timeout-min 240)
# Flags first, then key=value overrides (argparse reads no flag after them).
TRAIN=(--nodes "$NODES" --gpus-per-node "$GPUS")
LAYOUT=("parallel.tensor=$TP" "parallel.pipeline=$PP" train.save_every=50)
EVAL=(--job eval --nodes 1 --gpus-per-node "$GPUS")  # every GPU of a node: TP x DP, the work shared by the replicas
EVAL_LAYOUT=("parallel.tensor=$TP" parallel.pipeline=1)
stage=${1:-start}

# launch NAME ARGS...: `mdu-dist launch` on the cluster; prints the job ids it submitted, ':'-separated.
launch() {
    local name=$1
    shift
    if [[ -n ${MDU_DRY_RUN:-} ]]; then
        printf '%q ' mdu-dist launch --config "$CONFIG" "${SLURM[@]}" "$@" >&2
        echo >&2
        echo "<$name>"
        return
    fi
    mdu-dist launch --config "$CONFIG" "${SLURM[@]}" "$@" | tee -a "$RUNS/pipeline.log" |
        awk '$1 == "job" { sub(":", "", $2); ids = ids sep $2; sep = ":" } END { print ids }'
}

# after IDS STAGE: run STAGE of this script once the jobs IDS have all succeeded.
after() {
    local cmd=(sbatch --parsable --job-name "tofu-$2" --dependency "afterok:$1" --ntasks 1 --time 15
               --partition "$PARTITION" --account "$ACCOUNT" --output "$RUNS/pipeline-$2-%j.out"
               --wrap "bash launchers/slurm/pipeline_tofu.sh $2")
    if [[ -n ${MDU_DRY_RUN:-} ]]; then printf '%q ' "${cmd[@]}" >&2; echo >&2; else "${cmd[@]}"; fi
}

# The run directories `mdu-dist launch --sweep` writes (train.output_dir/<key>=<value>).
unlearned() {
    local t m
    for t in ${TAUS//,/ }; do echo "$RUNS/mdu/tau=$t"; done
    for m in ${BASELINES//,/ }; do echo "$RUNS/baselines/name=$m"; done
}

[[ -n ${MDU_DRY_RUN:-} ]] || mkdir -p "$RUNS"
case $stage in
start)
    ft=$(launch finetune --job finetune "${TRAIN[@]}" "${LAYOUT[@]}" data.finetune=full "train.init=$INIT" \
         "train.output_dir=$RUNS/finetune" "${FINETUNE[@]}")
    twin=$(launch twin --job finetune "${TRAIN[@]}" "${LAYOUT[@]}" data.finetune=retain90 "train.init=$INIT" \
           "train.output_dir=$RUNS/retain_only" "${FINETUNE[@]}")
    after "$ft:$twin" unlearn ;;
unlearn)
    # The finetuned model's latest checkpoint (step-N sorts by N; .step-N.partial never matches).
    init=$RUNS/finetune/checkpoints/step-N/model
    [[ -n ${MDU_DRY_RUN:-} ]] || init=$(ls -d "$RUNS"/finetune/checkpoints/step-* | sort -V | tail -n 1)/model
    mdu=$(launch mdu --job unlearn "${TRAIN[@]}" --sweep "method.tau=$TAUS" "${LAYOUT[@]}" method.name=mdu \
          "train.init=$init" "train.output_dir=$RUNS/mdu" data.forget=forget10 data.retain=retain90 "${UNLEARN[@]}")
    base=$(launch baselines --job unlearn "${TRAIN[@]}" --sweep "method.name=$BASELINES" "${LAYOUT[@]}" \
           "train.init=$init" "train.output_dir=$RUNS/baselines" data.forget=forget10 data.retain=retain90 \
           "${UNLEARN[@]}")
    twin=$(launch eval-twin "${EVAL[@]}" "${EVAL_LAYOUT[@]}" "eval.checkpoint=$RUNS/retain_only" \
           "eval.output_dir=$RUNS/retain_only/eval")
    after "$mdu:$base:$twin" eval ;;
eval)
    # One array task per run directory; each writes <run>/eval/eval.json (launch --sweep eval.checkpoint=...).
    runs=$(echo "$RUNS/finetune" $(unlearned) | tr ' ' ,)
    ids=$(launch eval "${EVAL[@]}" --sweep "eval.checkpoint=$runs" "${EVAL_LAYOUT[@]}" \
          "eval.retain_model_eval=$RUNS/retain_only/eval/eval.json")
    after "$ids" report ;;
report)
    # Every eval.json below $RUNS, labelled by its run's path (finetune, mdu/tau=0.5, baselines/name=ga, ...).
    cmd=(mdu-dist report "$RUNS" --output "$RUNS/report")
    if [[ -n ${MDU_DRY_RUN:-} ]]; then printf '%q ' "${cmd[@]}" >&2; echo >&2; exit 0; fi
    "${cmd[@]}" ;;
*)
    echo "unknown stage $stage (start, unlearn, eval, report)" >&2
    exit 2 ;;
esac
