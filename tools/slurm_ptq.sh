#!/usr/bin/env bash
# BRECQ PTQ on a Slurm cluster (mmengine's slurm launcher: one task per GPU).
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#       tools/slurm_ptq.sh PARTITION JOB_NAME CONFIG [tools/ptq.py args...]
#
# GPUS=16 GPUS_PER_NODE=8 spans two nodes. The work dir (--work-dir) must be on a shared
# file system. MASTER_PORT (default 29500) can be set when several jobs share a node.

set -x

PARTITION=$1
JOB_NAME=$2
CONFIG=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PY_ARGS=${@:4}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname $0)/..":$PYTHONPATH \
srun -p ${PARTITION} \
    --job-name=${JOB_NAME} \
    --gres=gpu:${GPUS_PER_NODE} \
    --ntasks=${GPUS} \
    --ntasks-per-node=${GPUS_PER_NODE} \
    --cpus-per-task=${CPUS_PER_TASK} \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    $PYTHON -u $(dirname "$0")/ptq.py ${CONFIG} --launcher="slurm" ${PY_ARGS}
