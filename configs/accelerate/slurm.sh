#!/bin/bash
# SLURM: one task per node; each starts accelerate's launcher for its GPUs.
#   sbatch configs/accelerate/slurm.sh configs/pipelines/qwen2.5-0.5b-dpo.yaml /shared/runs/dpo
#SBATCH --job-name=alignkit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
set -euo pipefail
CONFIG=$1
RUN_DIR=$2
MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c "accelerate launch --config_file configs/accelerate/two-nodes.yaml \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * 8)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $MAIN --main_process_port 29500 \
    -m alignkit run $CONFIG --run-dir $RUN_DIR"
