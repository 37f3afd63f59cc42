#!/bin/bash
#PBS -N spngd-rn50
#PBS -q rt_HF
#PBS -l select=2:mpiprocs=8
#PBS -l walltime=01:00:00
#PBS -P gxx00000
#PBS -j oe
# spngd training job on abci3: ABCI 3.0, PBS Professional, rt_HF nodes of 8x H200.
# 2 node(s) x 8 rank(s) = 16 ranks, one per GPU; walltime 01:00:00.
# Written by `spngd submit` from jobscripts/systems/abci3.yaml and jobscripts/pbs.sh.tmpl
# (change those, not this file) and submitted with: qsub /home/user/spngd/runs/rn50/job-abci3.sh
# Exit code 85 means "checkpointed, run me again"; every run resumes with --resume auto.
set -eo pipefail
# PBS copies a job's output back only when the job ends: write it to the run's log folder instead.
mkdir -p /home/user/spngd/runs/rn50/logs
exec >>/home/user/spngd/runs/rn50/logs/spngd-rn50-"$PBS_JOBID.log" 2>&1
this_job="$PBS_JOBID"
cd /home/user/spngd

# Site software (names and versions as of writing: check `module avail` on the system).
if ! command -v module >/dev/null 2>&1; then
    # shellcheck source=/dev/null
    source /etc/profile.d/modules.sh
fi
module load cuda/12.6/12.6.1 cudnn/9.5/9.5.1 hpcx/2.20

# The environment spngd was submitted from: its torch, mpi4py and, without a site MPI, its mpirun.
export PATH=/home/user/spngd/.venv/bin:"$PATH"
set -u

# Communication and threading knobs, exported to every rank.
# CPU threads per rank = its share of the node's cores (torch would use them all, in every rank).
export OMP_NUM_THREADS=12
# NCCL prints problems only; INFO shows the transports it picked (InfiniBand, NVLink) when tuning.
export NCCL_DEBUG=WARN
# A failed NCCL collective aborts the job instead of leaving the other ranks waiting until the timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# UCX's memory-type cache can misclassify CUDA buffers handed to MPI (Horovod, mpi4py); look each one up.
export UCX_MEMTYPE_CACHE=n

# One rank per GPU: spngd binds each rank to cuda:<local rank>, so every rank must see all of its
# node's GPUs. Stop here, once, when the job was given fewer than 8 per node.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -ra visible_gpus <<< "$CUDA_VISIBLE_DEVICES"
    if (( ${#visible_gpus[@]} < 8 )); then
        echo "spngd: job $this_job sees ${#visible_gpus[@]} GPU(s) (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES), needs 8" >&2
        exit 2
    fi
fi

# Fixed at submit time, so that a requeued or chained run finds this run's checkpoints.
run_name=rn50

# Stage the dataset to node-local scratch, one copy per node, so that every epoch reads local
# storage instead of ~1M small files on the shared file system.
data_dir="$PBS_LOCALDIR/spngd-data"
per_node=(mpirun -np 2 --hostfile "$PBS_NODEFILE" --map-by ppr:1:node -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x NCCL_DEBUG -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x UCX_MEMTYPE_CACHE)
"${per_node[@]}" mkdir -p "$data_dir"
"${per_node[@]}" cp -a /path/to/ILSVRC2012/. "$data_dir/"

# Train. The launcher runs in the background so that this shell can pass signals on: USR1 means
# "checkpoint now and exit 85"; TERM (scancel, qdel, preemption) does the same, but then the
# scheduler, not this script, decides whether the job runs again. `spngd launch` keeps TERM from
# the launcher (mpirun kills the ranks 0.5 s after one, mid-checkpoint) and turns it into USR1.
cmd=(
    spngd launch mpirun -np 16 --hostfile "$PBS_NODEFILE" --map-by ppr:8:node -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x NCCL_DEBUG -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x UCX_MEMTYPE_CACHE
    spngd train --config configs/imagenet_resnet50_sgd_bs8k.yaml --resume auto
    --set optim.lr=0.2
    --set output.dir=runs --set "output.name=$run_name"
    --set "data.path=$data_dir"
)
echo "spngd: job $this_job on $(hostname) at $(date '+%F %T'): ${cmd[*]}"
"${cmd[@]}" &
child=$!
got_term=0
trap 'kill -USR1 "$child" 2>/dev/null || true' USR1
trap 'got_term=1; kill -USR1 "$child" 2>/dev/null || true' TERM
# This scheduler kills at the walltime without a warning signal, so warn ourselves 300 s before.
warn_at=$((SECONDS + 3300))
while kill -0 "$child" 2>/dev/null; do
    if (( warn_at > 0 && SECONDS >= warn_at )); then
        warn_at=0
        echo "spngd: 300 s of walltime left, asking for a checkpoint"
        kill -USR1 "$child" 2>/dev/null || true
    fi
    sleep 1 & wait $! || true  # returns at once when a trapped signal arrives
done
status=0
wait "$child" || status=$?
echo "spngd: training exited with status $status at $(date '+%F %T')"
if (( status == 85 && got_term == 0 )); then
    echo "spngd: checkpointed before the walltime, running the job again"
    qsub -W depend=afterany:"$this_job" /home/user/spngd/runs/rn50/job-abci3.sh
fi
exit "$status"
