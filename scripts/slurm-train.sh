#!/usr/bin/env bash
# Multi-node data-parallel training under Slurm. The default: one rank per GPU over NCCL (a binary
# from scripts/build-cuda.sh --nccl, libnccl.so.2 on LD_LIBRARY_PATH), NCCL's bootstrap root at
# MASTER_ADDR:MASTER_PORT+1 (the first node). BACKEND=mpi: CPU ranks over MPI.
#
#   sbatch --nodes 4 scripts/slurm-train.sh configs/gpt2-1.38b.toml [--set k=v ...]
#
# BIN names the binary (built with --features mpi for BACKEND=mpi); the run and
# data folders of the config must be on a filesystem every node mounts. Submitting the same
# command again continues the job from its last checkpoint, with any number of nodes.
# CPU cluster: BACKEND=mpi and a binary built with `--features mpi` (srun starts the MPI ranks
# through PMIx; RAYON_NUM_THREADS = cores per task).
#SBATCH --job-name=cocomix
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
config=${1:?usage: sbatch scripts/slurm-train.sh CONFIG [--set k=v ...]}
shift
bin=${BIN:-target/cuda/release/cocomix}
backend=${BACKEND:-nccl}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-29500}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# Every task sees all GPUs of its node and takes GPU LOCAL_RANK (do not bind one GPU per
# task with --gpus-per-task: each would then see only "GPU 0"). --kill-on-bad-exit ends the
# whole job when one rank dies, instead of leaving the others to their timeout.
if [ "$backend" = mpi ]; then
  exec srun --mpi=pmix --kill-on-bad-exit=1 "$bin" train --config "$config" \
    --set dist.backend=mpi "$@"
fi
exec srun --kill-on-bad-exit=1 bash -c '
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  exec "$0" "$@"' "$bin" train --config "$config" \
  --set dist.backend=nccl --set dist.nccl_bootstrap=env "$@"
