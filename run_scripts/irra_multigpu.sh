#!/usr/bin/env bash
# IRRA on CUHK-PEDES with DDP: 4 GPUs on one node. --batch_size is the global batch (16 per GPU
# here, as the paper's 64 on one GPU); SDM sees all 64 samples of a step through the all-gather.
# Multi-node: replace --standalone by --nnodes N --node_rank R --rdzv_backend c10d
# --rdzv_endpoint HOST:PORT on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-4}
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train.py \
  --config_file configs/irra/cuhk_pedes.yaml --batch_size 64 --amp bf16 "$@"
