#!/bin/bash
#SBATCH --job-name=spngd-demo-lr-20261122-120000
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --gpus-per-node=4
#SBATCH --time=04:00:00
#SBATCH --account=gxx00000
#SBATCH --output=/home/user/spngd/runs/demo-lr-20261122-120000/logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# --signal=B: sends USR1 to this shell, which passes it to srun or mpirun alike; --open-mode=append
# keeps the log of every requeued run in one file.
# spngd training sweep on slurm-v100: SLURM, nodes of 4x V100, srun --mpi=pmix.
# 1 node(s) x 4 rank(s) = 4 ranks, one per GPU; walltime 04:00:00.
# Written by `spngd submit` from jobscripts/systems/slurm-v100.yaml and jobscripts/slurm.sh.tmpl
# (change those, not this file) and submitted with: sbatch --parsable --array=1-3 /home/user/spngd/runs/demo-lr-20261122-120000/sweep-slurm-v100.sh
# Exit code 85 means "checkpointed, run me again"; every run resumes with --resume auto.
set -eo pipefail
this_job="$SLURM_JOB_ID"
cd /home/user/spngd

# The environment spngd was submitted from: its torch, mpi4py and, without a site MPI, its mpirun.
export PATH=/home/user/spngd/.venv/bin:"$PATH"
set -u

# Communication and threading knobs, exported to every rank.
# CPU threads per rank = its share of the node's cores (torch would use them all, in every rank).
export OMP_NUM_THREADS=10
# NCCL prints problems only; INFO shows the transports it picked (InfiniBand, NVLink) when tuning.
export NCCL_DEBUG=WARN
# A failed NCCL collective aborts the job instead of leaving the other ranks waiting until the timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# One rank per GPU: spngd binds each rank to cuda:<local rank>, so every rank must see all of its
# node's GPUs. Stop here, once, when the job was given fewer than 4 per node.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -ra visible_gpus <<< "$CUDA_VISIBLE_DEVICES"
    if (( ${#visible_gpus[@]} < 4 )); then
        echo "spngd: job $this_job sees ${#visible_gpus[@]} GPU(s) (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES), needs 4" >&2
        exit 2
    fi
fi

# Random-search trial: its hyperparameters were derived by `spngd submit` from (sweep seed
# 2012, array index); `spngd sweep-report` derives the same values again.
trial="${SPNGD_TRIAL:-$SLURM_ARRAY_TASK_ID}"
case "$trial" in
    1) trial_args=(--set optim.lr=0.2327 --set optim.momentum=0.8084 --set optim.weight_decay=4.794e-05 --set optim.nesterov=true) ;;
    2) trial_args=(--set optim.lr=0.1234 --set optim.momentum=0.8547 --set optim.weight_decay=0.0007195 --set optim.nesterov=false) ;;
    3) trial_args=(--set optim.lr=0.04892 --set optim.momentum=0.8275 --set optim.weight_decay=0.0001849 --set optim.nesterov=true) ;;
    *) echo "spngd: this sweep has no trial '$trial' (it has 1-3)" >&2; exit 2 ;;
esac
run_name="trial-$(printf '%03d' "$trial")"

# Train. The launcher runs in the background so that this shell can pass signals on: USR1 means
# "checkpoint now and exit 85"; TERM (scancel, qdel, preemption) does the same, but then the
# scheduler, not this script, decides whether the job runs again. `spngd launch` keeps TERM from
# the launcher (mpirun kills the ranks 0.5 s after one, mid-checkpoint) and turns it into USR1.
cmd=(
    spngd launch srun --mpi=pmix --nodes=1 --ntasks=4 --ntasks-per-node=4 --cpus-per-task=10 --kill-on-bad-exit=1
    spngd train --config configs/smoke.yaml --resume auto
    --set output.dir=runs/demo-lr-20261122-120000 --set "output.name=$run_name"
    "${trial_args[@]}"
)
echo "spngd: job $this_job on $(hostname) at $(date '+%F %T'): ${cmd[*]}"
"${cmd[@]}" &
child=$!
got_term=0
trap 'kill -USR1 "$child" 2>/dev/null || true' USR1
trap 'got_term=1; kill -USR1 "$child" 2>/dev/null || true' TERM
while kill -0 "$child" 2>/dev/null; do
    sleep 1 & wait $! || true  # returns at once when a trapped signal arrives
done
status=0
wait "$child" || status=$?
echo "spngd: training exited with status $status at $(date '+%F %T')"
if (( status == 85 && got_term == 0 )); then
    echo "spngd: checkpointed before the walltime, running the job again"
    scontrol requeue "$this_job"
fi
exit "$status"
