#!/bin/bash
#SBATCH --job-name=spngd-rn50
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --gpus-per-node=4
#SBATCH --time=04:00:00
#SBATCH --account=gxx00000
#SBATCH --output=/home/user/spngd/runs/rn50/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
# --signal=B: sends USR1 to this shell, which passes it to srun or mpirun alike; --open-mode=append
# keeps the log of every requeued run in one file.
# spngd training job on slurm-v100: SLURM, nodes of 4x V100, srun --mpi=pmix.
# 2 node(s) x 4 rank(s) = 8 ranks, one per GPU; walltime 04:00:00.
# Written by `spngd submit` from jobscripts/systems/slurm-v100.yaml and jobscripts/slurm.sh.tmpl
# (change those, not this file) and submitted with: sbatch --parsable /home/user/spngd/runs/rn50/job-slurm-v100.sh
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

# Fixed at submit time, so that a requeued or chained run finds this run's checkpoints.
run_name=rn50

# Train. The launcher runs in the background so that this shell can pass signals on: USR1 means
# "checkpoint now and exit 85"; TERM (scancel, qdel, preemption) does the same, but then the
# scheduler, not this script, decides whether the job runs again. `spngd launch` keeps TERM from
# the launcher (mpirun kills the ranks 0.5 s after one, mid-checkpoint) and turns it into USR1.
cmd=(
    spngd launch srun --mpi=pmix --nodes=2 --ntasks=8 --ntasks-per-node=4 --cpus-per-task=10 --kill-on-bad-exit=1
    spngd train --config configs/imagenet_resnet50_sgd_bs8k.yaml --resume auto
    --set optim.lr=0.2
    --set output.dir=runs --set "output.name=$run_name"
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
