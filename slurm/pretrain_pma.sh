#!/bin/bash
# Multi-node pretraining with PMA checkpoint merging (megatron-pma).
#
#   SAVE_DIR=/lustre/me/gpt-1b \
#   TRAIN_SCRIPT=$MEGATRON_LM/pretrain_gpt.py TRAIN_ARGS="--num-layers 24 ... --train-iters 100000" \
#   PMA_NUM_MODELS=4 PMA_MODE=hook \
#   sbatch --nodes=4 --gpus-per-node=8 --partition=batch --account=myacct --time=04:00:00 \
#          slurm/pretrain_pma.sh [extra trainer arguments...]
#
#   # CPU (what tests/slurm runs; gloo):
#   SAVE_DIR=/tmp/run GPUS_PER_NODE=0 TRAIN_SCRIPT=examples/tiny_pretrain.py sbatch --nodes=2 slurm/pretrain_pma.sh
#
# One launcher per node: srun starts one `torchrun` per node (node rank = SLURM_NODEID), all meeting at
# the first host of the allocation (`scontrol show hostnames $SLURM_JOB_NODELIST | head -n1`).
#
# Knobs (environment variables; defaults in brackets):
#   SAVE_DIR          REQUIRED. Checkpoint directory; also the load directory (auto-resume: a job that
#                     finds latest_checkpointed_iteration.txt there continues from it).
#   TRAIN_SCRIPT      Trainer. [$MEGATRON_LM_DIR/pretrain_gpt.py if MEGATRON_LM_DIR is set,
#                     else examples/tiny_pretrain.py]. Relative paths: submit dir, then the checkout.
#   TRAIN_ARGS        Trainer arguments (model, data, --train-iters, --save-interval, ...), shell-quoted
#                     words. Arguments given to the script itself are appended. Do not pass --save/--load.
#   PMA_LAUNCHER      auto | megatron_lm | none [auto]. megatron_lm runs the trainer through
#                     `python -m megatron_pma.training.megatron_lm TRAIN_SCRIPT ...`, which adds the PMA hook
#                     to an unmodified Megatron-LM; auto picks it for any trainer outside megatron-pma's
#                     examples/ (those take the --pma-* flags themselves).
#   GPUS_PER_NODE     Processes per node = GPUs per node; 0 = CPU with gloo [auto: SLURM_GPUS_ON_NODE,
#                     else `nvidia-smi -L`, else 0]. Request the GPUs with sbatch --gpus-per-node.
#   CPU_PROCS_PER_NODE  Processes per node when GPUS_PER_NODE=0 [1].
#   PMA_NUM_MODELS    Checkpoints per merge (the PMA window); 0 = no merging [4].
#   PMA_METHOD        sma | ema | wma | lawa [sma].
#   PMA_ARGS          Extra PMA options (e.g. "--pma-alpha 0.2 --pma-interval-iters 1000") [empty].
#   PMA_MODE          hook | watcher [hook]. hook: the trainer merges after every save, in-process,
#                     without stalling. watcher: `megatron-pma watch` runs as a sidecar step on the first
#                     node, merges every new checkpoint from outside, and gets SIGTERM at the end.
#   PMA_OUTPUT_ROOT   Where merged checkpoints go [$SAVE_DIR/pma]; each merge is <root>/iter_XXXXXXX.
#   WATCH_ARGS        Extra `megatron-pma watch` options (watcher mode) [empty].
#   WATCH_POLL_SECS   Watcher mode: seconds between the watcher's looks at SAVE_DIR [30].
#   WATCH_DRAIN_SECS  Watcher mode: after training, wait up to this long for the watcher's merge of the
#                     final checkpoint before stopping it [120].
#   WATCH_STOP_SECS   Watcher mode: how long the watcher may take to stop after SIGTERM [60].
#   WATCH_FINAL_MERGE 1 = if the final window is still unmerged after the watcher stopped, merge it with
#                     `megatron-pma watch --once` (idempotent) [1].
#   EXIT_DURATION_MINS  auto | none | N. Passed as --exit-duration-in-mins so that the trainer saves and
#                     exits before the time limit [auto: time left in the job minus EXIT_MARGIN_MINS;
#                     nothing when the job has no time limit].
#   EXIT_MARGIN_MINS  Minutes kept free at the end of the job for the final save [10].
#   EXIT_DURATION_FLAG  The trainer's flag for it [--exit-duration-in-mins; none for examples/ trainers].
#   AUTO_RESUBMIT     1 = when training stops early (budget reached: saved iteration < TRAIN_ITERS) and
#                     made progress, submit this script again with `sbatch --dependency=singleton` (same
#                     job name, nodes, partition, account, time limit, arguments); the next job starts
#                     when this one ends and resumes from SAVE_DIR [0].
#   TRAIN_ITERS       Target iteration for AUTO_RESUBMIT [taken from --train-iters in TRAIN_ARGS].
#   MAX_RESUBMITS     Safety cap on the chain length [20].
#   RESUBMIT_SBATCH_ARGS  Extra sbatch options for the resubmitted job [empty].
#   PYTHON            Interpreter on every node [python3].
#   VENV              Virtualenv activated on every node [$PMA_ROOT/.venv if present and no container;
#                     "none" disables].
#   CONTAINER_IMAGE   pyxis/enroot image: every srun step gets --container-image [empty = no container].
#   CONTAINER_MOUNTS  --container-mounts value; the checkout, SAVE_DIR and the data must be inside [empty].
#   CONTAINER_WORKDIR Working directory in the container [submit dir].
#   MASTER_PORT       Rendezvous port [20000 + job id % 20000].
#   SRUN_ARGS         Extra srun options for every step [empty].
#   TORCHRUN_ARGS     Extra torchrun options [empty].
#
#SBATCH --job-name=pma-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --output=%x-%j.out
set -euo pipefail

# Find slurm/ (sbatch runs a copy of this file from the spool directory).
PMA_SLURM_DIR=${PMA_SLURM_DIR:-}
if [ -z "$PMA_SLURM_DIR" ]; then
    if [ -f "$(dirname "${BASH_SOURCE[0]}")/common.sh" ]; then
        PMA_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    elif [ -n "${SLURM_JOB_ID:-}" ]; then
        _cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Command=//p')
        [ -z "$_cmd" ] || PMA_SLURM_DIR=$(dirname "$_cmd")
    fi
fi
[ -f "${PMA_SLURM_DIR:-.}/common.sh" ] || { echo "pretrain_pma.sh: error: cannot find slurm/common.sh (set PMA_SLURM_DIR)" >&2; exit 2; }
PMA_SCRIPT_NAME=pretrain_pma.sh
# shellcheck source=slurm/common.sh
. "$PMA_SLURM_DIR/common.sh"

# --- configuration and fail-fast checks --------------------------------------------------------------
pma_require_var SAVE_DIR "the checkpoint directory, also used as the load directory for auto-resume"
pma_in_slurm_job

if [ -z "${TRAIN_SCRIPT:-}" ]; then
    if [ -n "${MEGATRON_LM_DIR:-}" ]; then TRAIN_SCRIPT=$MEGATRON_LM_DIR/pretrain_gpt.py
    else TRAIN_SCRIPT=examples/tiny_pretrain.py; fi
fi
TRAIN_SCRIPT=$(pma_resolve "$TRAIN_SCRIPT")
TRAIN_ARGS=${TRAIN_ARGS:-}
PMA_LAUNCHER=${PMA_LAUNCHER:-auto}
PMA_NUM_MODELS=${PMA_NUM_MODELS:-4}
PMA_METHOD=${PMA_METHOD:-sma}
PMA_ARGS=${PMA_ARGS:-}
PMA_MODE=${PMA_MODE:-hook}
PMA_OUTPUT_ROOT=${PMA_OUTPUT_ROOT:-$SAVE_DIR/pma}
WATCH_ARGS=${WATCH_ARGS:-}
WATCH_POLL_SECS=${WATCH_POLL_SECS:-30}
WATCH_FINAL_MERGE=${WATCH_FINAL_MERGE:-1}
WATCH_STOP_SECS=${WATCH_STOP_SECS:-60}
WATCH_DRAIN_SECS=${WATCH_DRAIN_SECS:-120}
EXIT_DURATION_MINS=${EXIT_DURATION_MINS:-auto}
EXIT_MARGIN_MINS=${EXIT_MARGIN_MINS:-10}
EXIT_DURATION_FLAG_SET=${EXIT_DURATION_FLAG:-}
EXIT_DURATION_FLAG=${EXIT_DURATION_FLAG---exit-duration-in-mins}
AUTO_RESUBMIT=${AUTO_RESUBMIT:-0}
MAX_RESUBMITS=${MAX_RESUBMITS:-20}
RESUBMIT_COUNT=${RESUBMIT_COUNT:-0}
CPU_PROCS_PER_NODE=${CPU_PROCS_PER_NODE:-1}
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}
GPUS_PER_NODE=${GPUS_PER_NODE:-auto}

[ -z "${CONTAINER_IMAGE:-}" ] && pma_require_file "$TRAIN_SCRIPT" "TRAIN_SCRIPT"
case $PMA_MODE in hook|watcher) ;; *) pma_die "PMA_MODE must be hook or watcher, not '$PMA_MODE'" ;; esac
case $PMA_LAUNCHER in auto|megatron_lm|none) ;; *) pma_die "PMA_LAUNCHER must be auto, megatron_lm or none, not '$PMA_LAUNCHER'" ;; esac
[[ $PMA_NUM_MODELS =~ ^[0-9]+$ ]] || pma_die "PMA_NUM_MODELS must be a number, not '$PMA_NUM_MODELS'"
[[ $AUTO_RESUBMIT =~ ^[01]$ ]] || pma_die "AUTO_RESUBMIT must be 0 or 1, not '$AUTO_RESUBMIT'"
if [ "$GPUS_PER_NODE" = auto ]; then
    if [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[0-9]+$ ]]; then GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    elif command -v nvidia-smi >/dev/null 2>&1; then GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    else GPUS_PER_NODE=0; fi
fi
[[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || pma_die "GPUS_PER_NODE must be a number (0 = CPU), not '$GPUS_PER_NODE'"
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    NPROC=$GPUS_PER_NODE
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron-LM's TP/SP overlap needs it
else
    NPROC=$CPU_PROCS_PER_NODE
fi

pma_split_args "$TRAIN_ARGS"; TRAIN_ARGV=("${_SPLIT[@]}" "$@")
for a in "${TRAIN_ARGV[@]}"; do
    case $a in --save|--save=*|--load|--load=*) pma_die "do not pass $a in TRAIN_ARGS: set SAVE_DIR (it is used for both --save and --load)" ;; esac
done
pma_split_args "$PMA_ARGS"; PMA_ARGV=("${_SPLIT[@]}")
pma_split_args "$WATCH_ARGS"; WATCH_ARGV=("${_SPLIT[@]}")
pma_split_args "$TORCHRUN_ARGS"; TORCHRUN_ARGV=("${_SPLIT[@]}")

# megatron-pma's own examples take --pma-* themselves and have no --exit-duration-in-mins.
IS_EXAMPLE=0
case $TRAIN_SCRIPT in "$PMA_ROOT"/examples/*) IS_EXAMPLE=1 ;; esac
if [ "$PMA_LAUNCHER" = auto ]; then
    if [ $IS_EXAMPLE = 1 ] || [ "$PMA_MODE" != hook ] || [ "$PMA_NUM_MODELS" = 0 ]; then PMA_LAUNCHER=none
    else PMA_LAUNCHER=megatron_lm; fi
fi
[ $IS_EXAMPLE = 0 ] || EXIT_DURATION_FLAG=${EXIT_DURATION_FLAG_SET:-}

pma_setup_env
export PMA_PYTHON=$PYTHON
pma_rendezvous
mkdir -p "$SAVE_DIR" || pma_die "cannot create SAVE_DIR=$SAVE_DIR"
[ "$PMA_MODE" = hook ] || [ "$PMA_NUM_MODELS" = 0 ] || mkdir -p "$PMA_OUTPUT_ROOT"

# Target iteration (auto-resubmit) from --train-iters unless TRAIN_ITERS is given.
if [ -z "${TRAIN_ITERS:-}" ]; then
    for ((i = 0; i < ${#TRAIN_ARGV[@]}; i++)); do
        case ${TRAIN_ARGV[$i]} in
            --train-iters=*) TRAIN_ITERS=${TRAIN_ARGV[$i]#--train-iters=} ;;
            --train-iters) TRAIN_ITERS=${TRAIN_ARGV[$((i + 1))]:-} ;;
        esac
    done
fi

# Exit duration: leave EXIT_MARGIN_MINS of the job's time for the final save.
EXIT_ARGV=()
EXIT_MINS=$EXIT_DURATION_MINS   # (the knob itself stays as given: a chained job computes its own)
if [ -n "$EXIT_DURATION_FLAG" ] && [ "$EXIT_MINS" != none ]; then
    if [ "$EXIT_MINS" = auto ]; then
        read -r limit left < <(squeue -h -j "$SLURM_JOB_ID" -o '%l %L' 2>/dev/null || true) || true
        mins=""
        case ${limit:-} in ''|UNLIMITED|INFINITE|NOT_SET|INVALID) left="" ;; esac
        if [[ ${left:-} =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]]; then
            mins=$(( ${BASH_REMATCH[2]:-0} * 1440 + 10#${BASH_REMATCH[4]:-0} * 60 + 10#${BASH_REMATCH[5]} - EXIT_MARGIN_MINS ))
            [ "$mins" -ge 1 ] || { pma_log "warning: only $left left in the job, less than EXIT_MARGIN_MINS=$EXIT_MARGIN_MINS"; mins=1; }
        fi
        EXIT_MINS=${mins:-none}
    fi
    if [ "$EXIT_MINS" != none ]; then
        [[ $EXIT_MINS =~ ^[0-9]+$ ]] || pma_die "EXIT_DURATION_MINS must be auto, none or whole minutes, not '$EXIT_DURATION_MINS'"
        EXIT_ARGV=("$EXIT_DURATION_FLAG" "$EXIT_MINS")
    fi
fi

# PMA flags for the trainer (hook mode).
HOOK_ARGV=()
if [ "$PMA_MODE" = hook ] && [ "$PMA_NUM_MODELS" -gt 0 ]; then
    HOOK_ARGV=(--pma-num-models "$PMA_NUM_MODELS" --pma-method "$PMA_METHOD" --pma-output-root "$PMA_OUTPUT_ROOT" "${PMA_ARGV[@]}")
fi

if [ "$PMA_LAUNCHER" = megatron_lm ]; then
    ENTRY=(-m megatron_pma.training.megatron_lm "$TRAIN_SCRIPT")
else
    ENTRY=("$TRAIN_SCRIPT")
fi
FULL_ARGV=("${ENTRY[@]}" "${TRAIN_ARGV[@]}" --save "$SAVE_DIR" --load "$SAVE_DIR" "${EXIT_ARGV[@]}" "${HOOK_ARGV[@]}")

ITER_BEFORE=$(pma_tracker_iteration "$SAVE_DIR")
pma_log "job $SLURM_JOB_ID: $NNODES node(s) x $NPROC proc(s) ($([ "$GPUS_PER_NODE" -gt 0 ] && echo "GPU, nccl" || echo "CPU, gloo")), rendezvous $MASTER_ADDR:$MASTER_PORT"
pma_log "save/load $SAVE_DIR (resuming from iteration ${ITER_BEFORE:-none}); PMA: mode=$PMA_MODE num_models=$PMA_NUM_MODELS method=$PMA_METHOD output=$PMA_OUTPUT_ROOT"
pma_log "trainer: ${FULL_ARGV[*]}"

# --- watcher sidecar (first node) -------------------------------------------------------------------------
WATCH_PID=""
WATCH_LOG=""
stop_watcher() {
    [ -n "$WATCH_PID" ] || return 0
    local st=0 i
    if kill -0 "$WATCH_PID" 2>/dev/null; then
        pma_log "stopping the watcher (SIGTERM)"
        # Signal the watcher's tasks (graceful: it stops polling and cleans up a merge in flight);
        # if that does not work within WATCH_STOP_SECS, SIGTERM srun itself (it then cancels the step).
        pma_signal_step pma-watch TERM || kill -TERM "$WATCH_PID" 2>/dev/null || true
        for ((i = 0; i < WATCH_STOP_SECS * 5; i++)); do kill -0 "$WATCH_PID" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$WATCH_PID" 2>/dev/null && { pma_log "watcher still running: cancelling its step"; kill -TERM "$WATCH_PID" 2>/dev/null || true; }
    fi
    wait "$WATCH_PID" 2>/dev/null || st=$?
    pma_log "watcher exited with status $st"
    WATCH_PID=""
    [ -z "$WATCH_LOG" ] || rm -f "$WATCH_LOG"
}
trap stop_watcher EXIT
if [ "$PMA_MODE" = watcher ] && [ "$PMA_NUM_MODELS" -gt 0 ]; then
    WATCH_CMD="exec \$PMA_PYTHON -m megatron_pma watch $(pma_quote --save-dir "$SAVE_DIR" --num-models "$PMA_NUM_MODELS" --method "$PMA_METHOD" --output-root "$PMA_OUTPUT_ROOT" --poll-interval "$WATCH_POLL_SECS" "${WATCH_ARGV[@]}")"
    pma_srun_cmd --overlap --nodes=1 --ntasks=1 --nodelist="$MASTER_ADDR" --job-name=pma-watch -- "$WATCH_CMD"
    # Its log goes to the job output and to a local file, to see when it has merged the final window.
    WATCH_LOG=$(mktemp "${TMPDIR:-/tmp}/pma-watch-$SLURM_JOB_ID.XXXXXX")
    "${PMA_SRUN[@]}" > >(tee -a "$WATCH_LOG" >&2) 2>&1 &
    WATCH_PID=$!
    pma_log "watcher started (srun pid $WATCH_PID): megatron-pma watch --save-dir $SAVE_DIR --num-models $PMA_NUM_MODELS"
fi

# --- training: one torchrun per node -------------------------------------------------------------------
RUN_CMD="echo \"[pretrain_pma.sh] node \$SLURMD_NODENAME: node rank \$SLURM_NODEID of $NNODES, $NPROC process(es)\" >&2; "
RUN_CMD+="exec \$PMA_PYTHON -m torch.distributed.run --nnodes=$NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$NPROC"
RUN_CMD+=" --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT --max_restarts=0$(pma_quote "${TORCHRUN_ARGV[@]}")"
RUN_CMD+="$(pma_quote "${FULL_ARGV[@]}")"
SRUN_OPTS=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --job-name=pma-train)
[ -z "${SLURM_CPUS_ON_NODE:-}" ] || SRUN_OPTS+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
T_START=$(date +%s)
set +e
pma_srun "${SRUN_OPTS[@]}" -- "$RUN_CMD"
RC=$?
set -e
ITER_AFTER=$(pma_tracker_iteration "$SAVE_DIR")
pma_log "training step exited with $RC after $(( $(date +%s) - T_START )) s; saved iteration ${ITER_AFTER:-none}"

# --- watcher: give it WATCH_DRAIN_SECS to merge the final window, stop it (SIGTERM), catch up ----------------
if [ -n "$WATCH_PID" ]; then
    final=""
    if [ "$RC" = 0 ] && [[ ${ITER_AFTER:-} =~ ^[0-9]+$ ]]; then
        final=$PMA_OUTPUT_ROOT/$(printf 'iter_%07d' "$((10#$ITER_AFTER))")
        nckpt=$(find "$SAVE_DIR" -maxdepth 2 -path "$SAVE_DIR/iter_*/metadata.json" 2>/dev/null | wc -l)
        # Done = the watcher reported the merge of the final iteration (merged or failed: one line per
        # merge) after the merge published its output and the PMA tracker.
        watcher_done() { grep -qE "(merged iteration|merge for iteration) $((10#$ITER_AFTER))\b" "$WATCH_LOG" 2>/dev/null; }
        if [ "$nckpt" -ge "$PMA_NUM_MODELS" ] && ! watcher_done; then
            pma_log "waiting up to ${WATCH_DRAIN_SECS}s for the watcher to merge the final window ($final)"
            deadline=$(( $(date +%s) + WATCH_DRAIN_SECS ))
            while ! watcher_done && [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$WATCH_PID" 2>/dev/null; do
                sleep 0.5
            done
        fi
    fi
    stop_watcher
    if [ -n "$final" ] && [ -d "$final" ] && [ "$(pma_tracker_iteration "$PMA_OUTPUT_ROOT")" = "$((10#$ITER_AFTER))" ]; then
        pma_log "the watcher merged the final window: $final"
    elif [ -n "$final" ] && [ "$WATCH_FINAL_MERGE" = 1 ]; then
        # `watch --once` merges the newest window if it has no output yet (idempotent), so the last
        # checkpoint of the job gets its merge even when the sidecar had not got to it.
        pma_log "final catch-up: megatron-pma watch --once"
        pma_srun --overlap --nodes=1 --ntasks=1 --nodelist="$MASTER_ADDR" --job-name=pma-watch-final \
            -- "${WATCH_CMD/ -m megatron_pma watch / -m megatron_pma watch --once }" \
            || pma_log "warning: the final catch-up merge failed (training itself succeeded)"
    fi
fi

[ "$RC" = 0 ] || { pma_log "training failed (exit $RC)"; exit "$RC"; }

# --- auto-resubmit (job chaining) ----------------------------------------------------------------------------
if [ "$AUTO_RESUBMIT" = 1 ]; then
    if ! [[ ${TRAIN_ITERS:-} =~ ^[0-9]+$ ]]; then
        pma_log "AUTO_RESUBMIT=1 but the target is unknown (set TRAIN_ITERS or pass --train-iters): not resubmitting"
    elif ! [[ ${ITER_AFTER:-} =~ ^[0-9]+$ ]]; then
        pma_log "AUTO_RESUBMIT=1 but no checkpoint was saved: not resubmitting"
    elif [ "$((10#$ITER_AFTER))" -ge "$TRAIN_ITERS" ]; then
        pma_log "training finished (iteration $ITER_AFTER >= $TRAIN_ITERS)"
    elif [[ ${ITER_BEFORE:-} =~ ^[0-9]+$ ]] && [ "$((10#$ITER_AFTER))" -le "$((10#$ITER_BEFORE))" ]; then
        pma_log "no progress in this job (iteration $ITER_AFTER): not resubmitting"
    elif [ "$RESUBMIT_COUNT" -ge "$MAX_RESUBMITS" ]; then
        pma_log "MAX_RESUBMITS=$MAX_RESUBMITS reached: not resubmitting"
    else
        jobinfo=$(scontrol show job -o "$SLURM_JOB_ID" | tr ' ' '\n')
        field() { printf '%s\n' "$jobinfo" | sed -n "s/^$1=//p" | head -n1; }
        SB=(--dependency=singleton --job-name="$SLURM_JOB_NAME" --nodes="$NNODES" --open-mode=append --parsable)
        [ -z "${SLURM_JOB_PARTITION:-}" ] || SB+=(--partition="$SLURM_JOB_PARTITION")
        [ -z "${SLURM_JOB_ACCOUNT:-}" ] || SB+=(--account="$SLURM_JOB_ACCOUNT")
        [ -z "${SLURM_JOB_QOS:-}" ] || SB+=(--qos="$SLURM_JOB_QOS")
        [ -z "${SLURM_JOB_RESERVATION:-}" ] || SB+=(--reservation="$SLURM_JOB_RESERVATION")
        tl=$(field TimeLimit); case $tl in ''|UNLIMITED|Partition_Limit) ;; *) SB+=(--time="$tl") ;; esac
        tpn=$(field TresPerNode); tpn=${tpn#gres:}; tpn=${tpn#gres/}   # GPUs: gpu:8
        case $tpn in ''|'(null)'|N/A) ;; *) SB+=(--gres="${tpn//gres\//}") ;; esac
        [ "$(field OverSubscribe)" != NO ] || SB+=(--exclusive)
        feat=$(field Features); case $feat in ''|'(null)') ;; *) SB+=(--constraint="$feat") ;; esac
        mem=$(field MinMemoryNode); case $mem in ''|0|0M) ;; *) SB+=(--mem="$mem") ;; esac
        # The same output pattern: this job's id in the file name (last occurrence) becomes %j again.
        as_pattern() {
            local d b; d=$(dirname "$1"); b=$(basename "$1")
            case $b in *"$SLURM_JOB_ID"*) b=${b%"$SLURM_JOB_ID"*}%j${b##*"$SLURM_JOB_ID"} ;; esac
            printf '%s/%s\n' "$d" "$b"
        }
        out=$(field StdOut); err=$(field StdErr)
        [ -z "$out" ] || SB+=(--output="$(as_pattern "$out")")
        [ -z "$err" ] || [ "$err" = "$out" ] || SB+=(--error="$(as_pattern "$err")")
        pma_split_args "${RESUBMIT_SBATCH_ARGS:-}"; SB+=("${_SPLIT[@]}")
        script=$PMA_SLURM_DIR/pretrain_pma.sh
        # A clean environment for the next job: this job's SLURM_* values and rendezvous must not leak
        # into it (MASTER_PORT stays only if it was given).
        clean=(env -u MASTER_ADDR -u NNODES -u PMA_PYTHON)
        [ -n "$PMA_USER_MASTER_PORT" ] || clean+=(-u MASTER_PORT)
        while IFS= read -r v; do [ "$v" = SLURM_CONF ] || clean+=(-u "$v"); done < <(compgen -e | grep '^SLURM_')
        next=$("${clean[@]}" RESUBMIT_COUNT=$((RESUBMIT_COUNT + 1)) PMA_SLURM_DIR="$PMA_SLURM_DIR" \
               sbatch "${SB[@]}" "$script" "$@") || pma_die "resubmission failed: sbatch ${SB[*]} $script"
        pma_log "iteration $ITER_AFTER < $TRAIN_ITERS: resubmitted as job $next (--dependency=singleton, chain $((RESUBMIT_COUNT + 1))/$MAX_RESUBMITS)"
    fi
fi
pma_log "done"
