#!/usr/bin/env bash
# Launch `selfsup fit` with torchrun: one process per device on this machine, or on several.
#   scripts/torchrun.sh --config configs/trainer/ddp.yaml --config configs/simclr/cifar10.yaml --data.root DIR
# Environment:
#   NPROC_PER_NODE  processes (devices) per machine; default: the number of GPUs (1 without)
#   NNODES          machines (default 1); with more than 1 also NODE_RANK, MASTER_ADDR, MASTER_PORT
#   PYTHON          the interpreter with selfsup installed (default: python)
# trainer.devices, trainer.num_nodes and the DDP strategy are set from these after your
# arguments, so the Trainer always agrees with the launcher (a mismatch hangs; Lightning #19883).
# The learning rate then follows the global batch: data.batch_size x NPROC_PER_NODE x NNODES.
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')}
NNODES=${NNODES:-1}
if [ "$NNODES" -eq 1 ]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
              --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC_PER_NODE" "${rendezvous[@]}" \
  -m selfsup.cli fit "$@" \
  --trainer.devices "$NPROC_PER_NODE" --trainer.num_nodes "$NNODES" --trainer.strategy ddp
