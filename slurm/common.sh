# shellcheck shell=bash
# Shared helpers for the megatron-pma sbatch scripts (sourced, not run).
#
# Provides: logging (pma_log, pma_die), checks (pma_require_var, pma_require_file, pma_require_dir),
# the Python environment (PYTHON, VENV -> pma_prelude), containers (CONTAINER_IMAGE / CONTAINER_MOUNTS
# -> pma_container_args, through pyxis), the rendezvous (pma_rendezvous: MASTER_ADDR, MASTER_PORT,
# NNODES) and pma_srun, which runs one command line per task, in the container if one is set.
#
# Environment read here (all optional):
#   PMA_ROOT          megatron-pma checkout (default: the parent of this slurm/ directory)
#   VENV              virtualenv to activate on every node (default: $PMA_ROOT/.venv if it exists and no
#                     container is used); VENV=none disables activation
#   PYTHON            Python interpreter (default: python3 after activation)
#   CONTAINER_IMAGE   pyxis/enroot image (srun --container-image); empty = no container
#   CONTAINER_MOUNTS  srun --container-mounts value (e.g. /lustre:/lustre,$HOME:$HOME)
#   CONTAINER_WORKDIR working dir inside the container (default: the submit dir)
#   SRUN_ARGS         extra arguments for every srun (e.g. "--mpi=none --cpu-bind=none")
#   MASTER_PORT       rendezvous port (default: 20000 + job id % 20000)

PMA_SCRIPT_NAME=${PMA_SCRIPT_NAME:-$(basename "${BASH_SOURCE[1]:-$0}")}

pma_log() { printf '[%s %s] %s\n' "$PMA_SCRIPT_NAME" "$(date -u +%H:%M:%S)" "$*" >&2; }

# One clear line on stderr, then exit (2 = usage/configuration error).
pma_die() { printf '%s: error: %s\n' "$PMA_SCRIPT_NAME" "$*" >&2; exit "${PMA_DIE_CODE:-2}"; }

pma_require_var() {  # pma_require_var NAME "what it is"
    [ -n "${!1:-}" ] || pma_die "$1 is required ($2); e.g. $1=... sbatch $PMA_SCRIPT_NAME"
}

pma_require_file() {  # pma_require_file PATH "what it is"
    [ -f "$1" ] || pma_die "$2 not found: $1"
}

pma_require_dir() {
    [ -d "$1" ] || pma_die "$2 not found: $1"
}

pma_in_slurm_job() {
    [ -n "${SLURM_JOB_ID:-}" ] || pma_die "not inside a Slurm job (no SLURM_JOB_ID): submit it with sbatch"
    command -v srun >/dev/null 2>&1 || pma_die "srun not found on PATH inside the job"
}

# Resolve a path given relative to the submit dir, falling back to the megatron-pma checkout.
pma_resolve() {
    local p=$1
    case $p in
        /*) printf '%s\n' "$p" ;;
        *)  if [ -e "$PWD/$p" ]; then printf '%s\n' "$PWD/$p"
            elif [ -e "$PMA_ROOT/$p" ]; then printf '%s\n' "$PMA_ROOT/$p"
            else printf '%s\n' "$PWD/$p"; fi ;;
    esac
}

PMA_ROOT=${PMA_ROOT:-$(cd "$PMA_SLURM_DIR/.." && pwd)}

# --- Python environment and container --------------------------------------------------------------

pma_setup_env() {
    if [ -n "${CONTAINER_IMAGE:-}" ]; then
        srun --help 2>&1 | grep -q -- '--container-image' \
            || pma_die "CONTAINER_IMAGE is set but this Slurm has no pyxis plugin (srun --container-image is unknown)"
        VENV=${VENV:-none}
    else
        if [ -z "${VENV:-}" ] && [ -f "$PMA_ROOT/.venv/bin/activate" ]; then
            VENV=$PMA_ROOT/.venv
        fi
        VENV=${VENV:-none}
        if [ "$VENV" != none ]; then
            pma_require_file "$VENV/bin/activate" "VENV (virtualenv) activation script"
        fi
    fi
    PYTHON=${PYTHON:-${PMA_DEFAULT_PYTHON:-python3}}
    # Check the interpreter (first word: PYTHON may be "uv run python") on this, the first, node now,
    # unless it only exists in the container.
    if [ -z "${CONTAINER_IMAGE:-}" ]; then
        (
            if [ "$VENV" != none ]; then . "$VENV/bin/activate"; fi
            command -v "${PYTHON%% *}" >/dev/null 2>&1
        ) || pma_die "PYTHON not found: $PYTHON (VENV=$VENV)"
    fi
}

# Shell code every task runs first: cd, activate the venv.
pma_prelude() {
    local s
    s="cd $(printf '%q' "${CONTAINER_WORKDIR:-$PWD}") || exit 2; "
    if [ "${VENV:-none}" != none ]; then
        s+=". $(printf '%q' "$VENV/bin/activate") || exit 2; "
    fi
    printf '%s' "$s"
}

pma_container_args() {
    [ -n "${CONTAINER_IMAGE:-}" ] || return 0
    printf '%s\n' "--container-image=$CONTAINER_IMAGE"
    printf '%s\n' "--container-workdir=${CONTAINER_WORKDIR:-$PWD}"
    [ -z "${CONTAINER_MOUNTS:-}" ] || printf '%s\n' "--container-mounts=$CONTAINER_MOUNTS"
}

# pma_srun [srun options...] -- COMMAND_LINE
#   Runs COMMAND_LINE (a shell string, evaluated on every task after the prelude) through srun,
#   inside the container when one is set. SLURM_* variables of each task are visible to it.
#   pma_srun_cmd takes the same arguments and only builds the command in the array PMA_SRUN, for
#   callers that need srun's own pid ("${PMA_SRUN[@]}" & pid=$!).
pma_srun_cmd() {
    local opts=() c
    while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
    shift || true
    local cmdline=$1
    local cargs=()
    while IFS= read -r c; do [ -n "$c" ] && cargs+=("$c"); done < <(pma_container_args)
    local extra=()
    # shellcheck disable=SC2206
    [ -z "${SRUN_ARGS:-}" ] || extra=(${SRUN_ARGS})
    PMA_SRUN=(srun "${opts[@]}" "${cargs[@]}" "${extra[@]}" bash -c "$(pma_prelude)$cmdline")
}

pma_srun() {
    pma_srun_cmd "$@"
    "${PMA_SRUN[@]}"
}

# Send a signal to the tasks of this job's step named NAME (scancel --signal: no forced kill).
# Returns 1 only when no such step is found. squeue is asked up to 5 times, a second apart: a busy
# slurmctld can fail a query (the caller's fallback, signalling srun, cancels the step instead).
# (scancel may report an error for the nodes of the job that do not run the step although the signal
# was delivered, so its status is not used.)
pma_signal_step() {  # pma_signal_step NAME SIGNAL
    local step="" out try
    for try in 1 2 3 4 5; do
        if out=$(squeue -h -s -j "$SLURM_JOB_ID" -o '%i %j' 2>&1); then
            step=$(awk -v n="$1" '$2 == n {print $1; exit}' <<<"$out")
            [ -n "$step" ] && break
        fi
        [ "$try" = 5 ] || sleep 1
    done
    if [ -z "$step" ]; then
        pma_log "no step named $1 found (squeue: ${out:-no output})"
        return 1
    fi
    scancel --signal="$2" "$step" 2>/dev/null || true
}

# --- rendezvous -----------------------------------------------------------------------------------

PMA_USER_MASTER_PORT=${MASTER_PORT:-}

pma_rendezvous() {
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    [ -n "$MASTER_ADDR" ] || pma_die "cannot find the first host of SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
    MASTER_PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
    export MASTER_ADDR MASTER_PORT NNODES
}

# Words of a shell-like argument string (TRAIN_ARGS, MERGE_ARGS), without evaluating anything but quotes.
pma_split_args() {  # pma_split_args "STRING" -> fills the array _SPLIT
    _SPLIT=()
    [ -n "$1" ] || return 0
    local out
    out=$(printf '%s' "$1" | xargs -r printf '%s\0' 2>/dev/null | tr '\0' '\n') \
        || pma_die "cannot parse argument string (unbalanced quotes?): $1"
    mapfile -t _SPLIT <<<"$out"
}

# Quote an array for use inside a bash -c command line.
pma_quote() { local a s=""; for a in "$@"; do s+=" $(printf '%q' "$a")"; done; printf '%s' "$s"; }

# Latest iteration in a Megatron save dir's tracker, or empty.
pma_tracker_iteration() {
    local t="$1/latest_checkpointed_iteration.txt"
    [ -f "$t" ] && tr -d ' \n' < "$t" || true
}
