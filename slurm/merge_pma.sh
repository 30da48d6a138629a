#!/bin/bash
# Offline PMA / LAWA merge of Megatron checkpoints, spread over nodes x tasks (megatron-pma).
#
#   OUTPUT=/lustre/me/gpt-1b/pma/iter_0100000 SAVE_DIR=/lustre/me/gpt-1b NUM_MODELS=8 METHOD=sma \
#   sbatch --nodes=2 --ntasks-per-node=8 --partition=cpu --account=myacct slurm/merge_pma.sh
#
#   OUTPUT=/tmp/merged INPUTS="/ckpt/iter_0000100 /ckpt/iter_0000200" sbatch --nodes=2 slurm/merge_pma.sh
#
# srun starts one process per task (RANK = SLURM_PROCID, WORLD_SIZE = SLURM_NTASKS, MASTER_ADDR = the
# first host of the allocation); each runs `python -m megatron_pma merge ... --output OUTPUT` and the
# engine splits the checkpoint's chunks over the ranks (gloo, no accelerator needed; CPU nodes are fine).
# The result is the same as with one process; OUTPUT is published atomically by rank 0. The merge is
# I/O bound: a few tasks per node are enough to saturate a parallel file system.
#
# Knobs (environment variables; defaults in brackets):
#   OUTPUT            REQUIRED. The merged checkpoint dir. Named iter_XXXXXXX, it also updates its
#                     parent's latest_checkpointed_iteration.txt (written last).
#   INPUTS            Checkpoint dirs to merge (space-separated, any order), or:
#   SAVE_DIR          a Megatron save dir: the window is its last NUM_MODELS checkpoints.
#   NUM_MODELS        Window size with SAVE_DIR [4].
#   METHOD            sma | ema | wma | lawa | custom [sma].
#   ALPHA             EMA smoothing factor (METHOD=ema) [0.2].
#   WEIGHTS           Custom weights w1,w2,... oldest first (METHOD=custom) [empty].
#   OPTIMIZER         drop | average | keep-last-moments [drop].
#   MERGE_ARGS        Extra `megatron-pma merge` options (e.g. "--interval-iters 1000 --force") [empty].
#   PYTHON            Interpreter on every node [python3].
#   VENV              Virtualenv activated on every node [$PMA_ROOT/.venv if present and no container].
#   CONTAINER_IMAGE   pyxis/enroot image (srun --container-image) [empty = no container].
#   CONTAINER_MOUNTS  --container-mounts value; inputs and OUTPUT must be inside [empty].
#   MASTER_PORT       Rendezvous port [20000 + job id % 20000].
#   SRUN_ARGS         Extra srun options [empty].
# Processes: one per Slurm task: choose them with sbatch --nodes / --ntasks-per-node.
#
#SBATCH --job-name=pma-merge
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
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
[ -f "${PMA_SLURM_DIR:-.}/common.sh" ] || { echo "merge_pma.sh: error: cannot find slurm/common.sh (set PMA_SLURM_DIR)" >&2; exit 2; }
PMA_SCRIPT_NAME=merge_pma.sh
# shellcheck source=slurm/common.sh
. "$PMA_SLURM_DIR/common.sh"

pma_require_var OUTPUT "the merged checkpoint directory to create"
[ -n "${INPUTS:-}" ] || [ -n "${SAVE_DIR:-}" ] \
    || pma_die "INPUTS (checkpoint dirs) or SAVE_DIR (a save dir to take the window from) is required"
pma_in_slurm_job

METHOD=${METHOD:-sma}
ALPHA=${ALPHA:-0.2}
WEIGHTS=${WEIGHTS:-}
OPTIMIZER=${OPTIMIZER:-drop}
NUM_MODELS=${NUM_MODELS:-4}
MERGE_ARGS=${MERGE_ARGS:-}

ARGV=(merge --output "$OUTPUT" --method "$METHOD" --optimizer "$OPTIMIZER")
[ "$METHOD" != ema ] || ARGV+=(--alpha "$ALPHA")
[ -z "$WEIGHTS" ] || ARGV+=(--weights "$WEIGHTS")
if [ -n "${INPUTS:-}" ]; then
    pma_split_args "$INPUTS"
    for p in "${_SPLIT[@]}"; do
        [ -n "${CONTAINER_IMAGE:-}" ] || pma_require_dir "$p" "input checkpoint"
        ARGV+=("$p")
    done
else
    [ -n "${CONTAINER_IMAGE:-}" ] || pma_require_dir "$SAVE_DIR" "SAVE_DIR"
    ARGV+=(--save-dir "$SAVE_DIR" --num-models "$NUM_MODELS")
fi
pma_split_args "$MERGE_ARGS"; ARGV+=("${_SPLIT[@]}")
mkdir -p "$(dirname "$OUTPUT")" || pma_die "cannot create the parent of OUTPUT=$OUTPUT"

pma_setup_env
pma_rendezvous
NTASKS=${SLURM_NTASKS:-$NNODES}
pma_log "job $SLURM_JOB_ID: $NTASKS task(s) on $NNODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
pma_log "megatron-pma ${ARGV[*]}"

# Every task: rank and world from Slurm, then the merge. Only rank 0 prints progress.
CMD='export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; '
CMD+='q=""; [ "$RANK" = 0 ] || q=--quiet; '
CMD+="exec \$PMA_PYTHON -m megatron_pma$(pma_quote "${ARGV[@]}") \$q"
export PMA_PYTHON=$PYTHON
T0=$(date +%s)
set +e
pma_srun --nodes="$NNODES" --ntasks="$NTASKS" --kill-on-bad-exit=1 --job-name=pma-merge -- "$CMD"
RC=$?
set -e
if [ "$RC" = 0 ]; then
    pma_log "merged into $OUTPUT in $(( $(date +%s) - T0 )) s"
else
    pma_log "merge failed (exit $RC); nothing was published"
fi
exit "$RC"
