# Sourced by the sbatch scripts after they set CONFIG, TP, PP, INIT and OUT: runs `mdu-dist JOB` on every task
# of the allocation (JOB and extra key=value overrides are its arguments). Always train.resume=auto: a fresh
# OUT starts at step 0, a requeued job continues from its latest complete checkpoint.
job=$1
shift
cmd=(srun --kill-on-bad-exit=1 mdu-dist "$job" --config "$CONFIG" --nproc "${SLURM_NTASKS:-8}"
     "parallel.tensor=$TP" "parallel.pipeline=$PP" "train.init=$INIT" "train.output_dir=$OUT" train.resume=auto "$@")
echo "TensorBoard: tensorboard --logdir $OUT/tensorboard"
if [[ -n ${MDU_DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
# USR1 (#SBATCH --signal) comes before the time limit: back into the queue; the new run resumes.
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
"${cmd[@]}" &
wait $!  # srun runs in the background so that bash handles the trap while it runs
