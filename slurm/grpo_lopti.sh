#!/bin/bash
# NeMo-RL GRPO with the Lopti-aware loss (Advantage Reweighting + Low-Probability Token Isolation),
# multi-node, on a GPU cluster (megatron-pma). It cannot run on CPU-only machines.
#
#   CONTAINER_MOUNTS=/lustre:/lustre LOPTI_ETA=0.5 AR_ALPHA=0.3 \
#   sbatch --nodes=2 --gpus-per-node=8 --partition=batch --account=myacct --time=04:00:00 slurm/grpo_lopti.sh \
#          grpo.max_num_steps=500          # extra arguments: NeMo-RL config overrides
#
# By default it runs in NeMo-RL v0.7's container (nvcr.io/nvidia/nemo-rl:v0.7.0, NeMo-RL in /opt/nemo-rl);
# this checkout must be inside CONTAINER_MOUNTS. The default driver (examples/rl/nemo_rl_grpo_lopti.py)
# needs NeMo-RL v0.7. For v0.5/v0.6: CONTAINER_IMAGE=nvcr.io/nvidia/nemo-rl:v0.6.0 (or v0.5.0) and a
# RUN_SCRIPT of your own: that release's GRPO example plus the two lines named in the default driver's
# docstring, accepting the --config/--nemo-rl-root arguments this script passes.
#
# What it does: NeMo-RL runs on Ray, so the job first starts a Ray cluster over the allocation (the
# head on the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, one worker per other node,
# each `ray start --block` as its own srun step), waits until every node has joined, then runs the
# GRPO driver once, on the head node. The driver is megatron-pma's NeMo-RL entry point (RUN_SCRIPT,
# see examples/rl/): NeMo-RL's GRPO with `megatron_pma.rl.nemo_rl.LoptiClippedPGLossFn` as the loss
# and `LoptiPolicy` around the policy (two update stages per rollout batch when LOPTI_ETA is set).
# At the end the Ray steps are stopped with SIGTERM.
#
# Knobs (environment variables; defaults in brackets):
#   NEMO_RL_DIR       NeMo-RL (github.com/NVIDIA-NeMo/RL) as every node sees it; the driver runs from there
#                     (its examples/configs). [/opt/nemo-rl in a container; REQUIRED without one]
#   RUN_SCRIPT        The GRPO driver [examples/rl/nemo_rl_grpo_lopti.py of this checkout]; it gets
#                     --config CONFIG --nemo-rl-root NEMO_RL_DIR and the overrides.
#   CONFIG            Overrides YAML merged over NeMo-RL's grpo_math_1B.yaml
#                     [examples/rl/grpo_lopti_nemo_rl.yaml of this checkout].
#   LOPTI_ETA         Lopti probability threshold eta, in (0, 1]; "none" = off [0.5].
#   AR_ALPHA          Advantage Reweighting alpha, in [0, 1]; 0 = off [0.3].
#   OVERRIDES         More NeMo-RL config overrides (key=value words) [empty]; script arguments are
#                     appended to them.
#   GPUS_PER_NODE     GPUs per node given to Ray and to cluster.gpus_per_node [8; request them with
#                     sbatch --gpus-per-node].
#   RESULTS_DIR       Logs and checkpoints (logger.log_dir, checkpointing.checkpoint_dir)
#                     [$PWD/results/<job name>-<job id>].
#   PYTHON            Driver interpreter [python in a container (NeMo-RL's venv is on its PATH), else
#                     uv run python: NeMo-RL's own uv environment].
#   RAY               Ray CLI [ray]; e.g. "uv run ray" outside NeMo-RL's container.
#   RAY_PORT          Ray head port [6379].
#   RAY_WAIT_SECS     How long to wait for every node to join the Ray cluster [300].
#   RAY_HEAD_WAIT_SECS  Pause between starting the head and the workers [10].
#   CONTAINER_IMAGE   pyxis/enroot image (srun --container-image) [nvcr.io/nvidia/nemo-rl:v0.7.0 where this
#                     Slurm has pyxis, else none]; set it empty to run on the hosts.
#   CONTAINER_MOUNTS  --container-mounts value; NEMO_RL_DIR, this checkout and RESULTS_DIR must be inside.
#   CONTAINER_WORKDIR Working directory in the container [submit dir].
#   VENV              Virtualenv activated on every node [none in a container, else $PMA_ROOT/.venv if it
#                     exists].
#   SRUN_ARGS         Extra srun options [empty]. HF_HOME, HF_TOKEN, WANDB_API_KEY, ... pass through the
#                     environment (sbatch exports it).
#
#SBATCH --job-name=grpo-lopti
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

PMA_SLURM_DIR=${PMA_SLURM_DIR:-}
if [ -z "$PMA_SLURM_DIR" ]; then
    if [ -f "$(dirname "${BASH_SOURCE[0]}")/common.sh" ]; then
        PMA_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    elif [ -n "${SLURM_JOB_ID:-}" ]; then
        _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p')
        [ -z "$_cmd" ] || PMA_SLURM_DIR=$(dirname "$_cmd")
    fi
fi
[ -f "${PMA_SLURM_DIR:-.}/common.sh" ] || { echo "grpo_lopti.sh: error: cannot find slurm/common.sh (set PMA_SLURM_DIR)" >&2; exit 2; }
PMA_SCRIPT_NAME=grpo_lopti.sh
# shellcheck source=slurm/common.sh
. "$PMA_SLURM_DIR/common.sh"

# --- configuration and fail-fast checks --------------------------------------------------------------
DEFAULT_CONTAINER_IMAGE=nvcr.io/nvidia/nemo-rl:v0.7.0
if [ -z "${CONTAINER_IMAGE+set}" ]; then  # unset: NeMo-RL v0.7's container, where pyxis can run it
    if srun --help 2>&1 | grep -q -- '--container-image'; then CONTAINER_IMAGE=$DEFAULT_CONTAINER_IMAGE; else CONTAINER_IMAGE=; fi
fi
if [ -n "$CONTAINER_IMAGE" ]; then
    NEMO_RL_DIR=${NEMO_RL_DIR:-/opt/nemo-rl}
    PMA_DEFAULT_PYTHON=python
else
    PMA_DEFAULT_PYTHON="uv run python"
fi
pma_require_var NEMO_RL_DIR "a NeMo-RL checkout (github.com/NVIDIA-NeMo/RL) that every node can read"
pma_in_slurm_job

RUN_SCRIPT=$(pma_resolve "${RUN_SCRIPT:-examples/rl/nemo_rl_grpo_lopti.py}")
CONFIG=$(pma_resolve "${CONFIG:-examples/rl/grpo_lopti_nemo_rl.yaml}")
LOPTI_ETA=${LOPTI_ETA:-0.5}
AR_ALPHA=${AR_ALPHA:-0.3}
OVERRIDES=${OVERRIDES:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RESULTS_DIR=${RESULTS_DIR:-$PWD/results/${SLURM_JOB_NAME:-grpo-lopti}-$SLURM_JOB_ID}
RAY=${RAY:-ray}
RAY_PORT=${RAY_PORT:-6379}
RAY_WAIT_SECS=${RAY_WAIT_SECS:-300}
RAY_HEAD_WAIT_SECS=${RAY_HEAD_WAIT_SECS:-10}

if [ -z "$CONTAINER_IMAGE" ]; then
    pma_require_dir "$NEMO_RL_DIR" "NEMO_RL_DIR (NeMo-RL checkout)"
    pma_require_file "$RUN_SCRIPT" "RUN_SCRIPT (GRPO driver)"
    pma_require_file "$CONFIG" "CONFIG (NeMo-RL GRPO config)"
fi
[[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || pma_die "GPUS_PER_NODE must be >= 1 (NeMo-RL GRPO needs GPUs), not '$GPUS_PER_NODE'"
case $LOPTI_ETA in none) ;; *) awk -v e="$LOPTI_ETA" 'BEGIN{exit !(e > 0 && e <= 1)}' \
    || pma_die "LOPTI_ETA must be in (0, 1] or none, not '$LOPTI_ETA'" ;; esac
awk -v a="$AR_ALPHA" 'BEGIN{exit !(a >= 0 && a <= 1)}' || pma_die "AR_ALPHA must be in [0, 1], not '$AR_ALPHA'"

pma_setup_env
pma_rendezvous
mkdir -p "$RESULTS_DIR" || pma_die "cannot create RESULTS_DIR=$RESULTS_DIR"
HEAD=$MASTER_ADDR
HEAD_IP=$(getent ahostsv4 "$HEAD" 2>/dev/null | awk 'NR==1{print $1}')
HEAD_IP=${HEAD_IP:-$HEAD}
RAY_ADDRESS=$HEAD_IP:$RAY_PORT   # exported to the driver only (not to `ray start --head`)

pma_split_args "$OVERRIDES"; OVR=("${_SPLIT[@]}" "$@")
LOPTI_OVR=("loss_fn.advantage_reweight_alpha=$AR_ALPHA")
if [ "$LOPTI_ETA" = none ]; then LOPTI_OVR+=("loss_fn.lopti_eta=null"); else LOPTI_OVR+=("loss_fn.lopti_eta=$LOPTI_ETA"); fi
DRIVER_ARGV=("$RUN_SCRIPT" --config "$CONFIG" --nemo-rl-root "$NEMO_RL_DIR" "cluster.num_nodes=$NNODES" "cluster.gpus_per_node=$GPUS_PER_NODE"
             "logger.log_dir=$RESULTS_DIR/logs" "checkpointing.checkpoint_dir=$RESULTS_DIR/checkpoints"
             "${LOPTI_OVR[@]}" "${OVR[@]}")

pma_log "job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE GPU(s); Ray head $HEAD ($RAY_ADDRESS); container: ${CONTAINER_IMAGE:-none}"
pma_log "driver: $PYTHON ${DRIVER_ARGV[*]}"

# --- Ray cluster: head on the first node, one worker per other node ------------------------------------
RAY_PIDS=()
stop_ray() {
    local n
    for n in ray-head ray-workers; do pma_signal_step "$n" TERM 2>/dev/null || true; done
    for n in "${RAY_PIDS[@]}"; do wait "$n" 2>/dev/null || true; done
    RAY_PIDS=()
}
trap stop_ray EXIT

CPUS=${SLURM_CPUS_ON_NODE:-$(nproc)}
# Ray workers (which unpickle the Lopti loss) inherit the environment of `ray start`, not the driver's:
# megatron_pma must be importable there (this checkout on PYTHONPATH, or pip install -e it --no-deps
# into NeMo-RL's environment).
export PYTHONPATH=$PMA_ROOT${PYTHONPATH:+:$PYTHONPATH}
export NEMO_RL_ROOT=$NEMO_RL_DIR
pma_srun_cmd --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD" --job-name=ray-head -- \
    "exec $RAY start --head --node-ip-address=$HEAD_IP --port=$RAY_PORT --num-cpus=$CPUS --num-gpus=$GPUS_PER_NODE --block"
"${PMA_SRUN[@]}" &
RAY_PIDS+=($!)
if [ "$NNODES" -gt 1 ]; then
    sleep "$RAY_HEAD_WAIT_SECS"  # let the head come up before the workers dial in
    pma_srun_cmd --overlap --nodes=$((NNODES - 1)) --ntasks=$((NNODES - 1)) --ntasks-per-node=1 --exclude="$HEAD" \
        --job-name=ray-workers -- \
        "exec $RAY start --address=$RAY_ADDRESS --num-cpus=$CPUS --num-gpus=$GPUS_PER_NODE --block"
    "${PMA_SRUN[@]}" &
    RAY_PIDS+=($!)
fi

# --- driver on the head node: wait for all nodes, then GRPO ---------------------------------------------
DRIVER="cd $(printf '%q' "$NEMO_RL_DIR") || exit 2; export RAY_ADDRESS=$RAY_ADDRESS; "
DRIVER+="for i in \$(seq 1 $((RAY_WAIT_SECS / 5))); do "
DRIVER+="n=\$($RAY status --address=$RAY_ADDRESS 2>/dev/null | grep -c ' node_' || true); "
DRIVER+="[ \"\$n\" -ge $NNODES ] && break; sleep 5; done; "
DRIVER+="[ \"\$n\" -ge $NNODES ] || { echo 'grpo_lopti.sh: error: only '\$n' of $NNODES Ray nodes joined within ${RAY_WAIT_SECS}s' >&2; exit 3; }; "
DRIVER+="exec $PYTHON$(pma_quote "${DRIVER_ARGV[@]}")"
T0=$(date +%s)
set +e
pma_srun --overlap --nodes=1 --ntasks=1 --nodelist="$HEAD" --job-name=grpo-driver -- "$DRIVER"
RC=$?
set -e
pma_log "GRPO driver exited with $RC after $(( $(date +%s) - T0 )) s; results in $RESULTS_DIR"
stop_ray
exit "$RC"
