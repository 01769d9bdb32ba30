#!/usr/bin/env bash
# BRECQ PTQ on several GPUs of one or more nodes with torchrun (mmengine's pytorch launcher).
#
#   tools/dist_ptq.sh CONFIG GPUS [tools/ptq.py args...]
#
# Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR (and PORT) set, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 tools/dist_ptq.sh CONFIG 8   # on the first node
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 tools/dist_ptq.sh CONFIG 8   # on the second
# The work dir must be on a file system every node sees (rank 0 writes, all ranks read on --resume).
# Without CUDA the processes run on CPU over gloo. PYTHON picks the interpreter.

CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
$PYTHON -m torch.distributed.run \
    --nnodes=$NNODES \
    --node_rank=$NODE_RANK \
    --master_addr=$MASTER_ADDR \
    --nproc_per_node=$GPUS \
    --master_port=$PORT \
    $(dirname "$0")/ptq.py \
    $CONFIG \
    --launcher pytorch ${@:3}
