#!/bin/bash
#$ -N spngd-rn50
#$ -cwd
#$ -j y
#$ -o /home/user/spngd/runs/rn50/logs/
#$ -l h_rt=01:00:00
#$ -notify
#$ -l rt_F=2
# spngd training job on abci2-v100: ABCI 2.0, Univa Grid Engine, rt_F nodes of 4x V100.
# 2 node(s) x 4 rank(s) = 8 ranks, one per GPU; walltime 01:00:00.
# Written by `spngd submit` from jobscripts/systems/abci2-v100.yaml and jobscripts/sge.sh.tmpl
# (change those, not this file) and submitted with: qsub -terse -g gxx00000 /home/user/spngd/runs/rn50/job-abci2-v100.sh
# Exit code 85 means "checkpointed, run me again"; every run resumes with --resume auto.
set -eo pipefail
this_job="$JOB_ID"
cd /home/user/spngd

# Site software (names and versions as of writing: check `module avail` on the system).
if ! command -v module >/dev/null 2>&1; then
    # shellcheck source=/dev/null
    source /etc/profile.d/modules.sh
fi
module load cuda/12.2/12.2.0 cudnn/8.9/8.9.7 hpcx/2.12

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
# UCX's memory-type cache can misclassify CUDA buffers handed to MPI (Horovod, mpi4py); look each one up.
export UCX_MEMTYPE_CACHE=n

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

# Stage the dataset to node-local scratch, one copy per node, so that every epoch reads local
# storage instead of ~1M small files on the shared file system.
data_dir="$SGE_LOCALDIR/spngd-data"
per_node=(mpirun -np 2 --hostfile "$SGE_JOB_HOSTLIST" --map-by ppr:1:node -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x NCCL_DEBUG -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x UCX_MEMTYPE_CACHE)
"${per_node[@]}" mkdir -p "$data_dir"
"${per_node[@]}" cp -a /path/to/ILSVRC2012/. "$data_dir/"

# Train. The launcher runs in the background so that this shell can pass signals on: USR1 means
# "checkpoint now and exit 85"; TERM (scancel, qdel, preemption) does the same, but then the
# scheduler, not this script, decides whether the job runs again. `spngd launch` keeps TERM from
# the launcher (mpirun kills the ranks 0.5 s after one, mid-checkpoint) and turns it into USR1.
cmd=(
    spngd launch mpirun -np 8 --hostfile "$SGE_JOB_HOSTLIST" --map-by ppr:4:node -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS -x NCCL_DEBUG -x TORCH_NCCL_ASYNC_ERROR_HANDLING -x UCX_MEMTYPE_CACHE
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
# qdel: -notify sends USR2 to the job (this shell and the launcher, which passes it on to the
# ranks) the queue's `notify` time (qconf -sq; 60 s by default) before its SIGKILL. Before a
# suspension it sends USR1 instead, which checkpoints and chains a follow-up like a walltime warning.
trap 'got_term=1; kill -USR1 "$child" 2>/dev/null || true' TERM USR2
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
    qsub -g gxx00000 -hold_jid "$this_job" /home/user/spngd/runs/rn50/job-abci2-v100.sh
fi
exit "$status"
