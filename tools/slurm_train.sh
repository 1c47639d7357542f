#!/bin/bash
# Multi-node training on a SLURM cluster: one SLURM task per node runs torchrun, which starts one training
# process per GPU of its node; the torchrun agents of all nodes meet through a c10d rendezvous hosted on the
# first node of the allocation. tools/train.py needs no change: it reads the variables torchrun sets.
#
# Submit from the repository root, with the usual train.py arguments after the script:
#
#   sbatch tools/slurm_train.sh --config configs/detr_r50_coco.yaml data.root=/path/to/coco \
#       model.backbone_weights=/path/to/resnet50.pth output_dir=runs/detr_r50
#
# Batch and learning rate: data.batch_size is per process, so the total batch is
# nodes x GPUs per node x data.batch_size. The #SBATCH lines below (4 nodes x 8 GPUs) with the config's
# batch 2 give a total batch of 64, the batch DETR-R50's lr 1e-4 (backbone 1e-5) was set for. Change one,
# and state (or rescale) the other: the toolkit does not rescale the learning rate.
#
# Resuming: output_dir/checkpoint.pth is written at the end of every epoch (by rank 0, atomically) and the
# same command resumes from it on every rank, so a requeued or resubmitted job continues where it stopped.
# Keep output_dir on a file system that every node sees.

#SBATCH --job-name=detr_ot
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1        # one torchrun per node; torchrun starts the per-GPU processes itself
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64         # shared by the node's processes and their DataLoader workers
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --requeue                  # a preempted job restarts and resumes from its checkpoint

set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON=${PYTHON:-.venv/bin/python}               # the environment made by tools/setup_env.sh
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
RDZV_PORT=${RDZV_PORT:-29500}                   # any free TCP port on the first node
# The rendezvous host: the first node of the allocation (every node computes the same name).
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# Intra-op threads per process: the task's CPUs split over its processes (torchrun would default to 1).
THREADS=$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE ))
(( THREADS >= 1 )) || THREADS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS}
# export NCCL_DEBUG=WARN                         # uncomment to diagnose NCCL start-up problems
# export NCCL_SOCKET_IFNAME=ib0                  # pin NCCL to the cluster's fast interface if needed

echo "nodes: $SLURM_JOB_NODELIST ($SLURM_NNODES x $GPUS_PER_NODE GPUs), rendezvous $RDZV_HOST:$RDZV_PORT"

# --rdzv-id: the same on every node of this job, and new after a requeue (restart count).
# --kill-on-bad-exit: if one node's torchrun fails, SLURM stops the others instead of leaving them waiting.
srun --kill-on-bad-exit=1 "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-id="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
    tools/train.py --no-progress "$@"
