#!/usr/bin/env bash
# Stop the one-machine Slurm cluster started by .ci/slurm_up.sh and undo its changes outside
# $SLURM_CI_DIR: the /etc/hosts line for n1/n2 and the /etc/slurm/slurm.conf symlink.
# Daemons are stopped by the pids in their pid files (never by name). Idempotent.
#   .ci/slurm_down.sh [--quiet] [--keep-dir]    (--keep-dir keeps logs and state for inspection)
set -uo pipefail

DIR=${SLURM_CI_DIR:-/tmp/megatron-pma-slurm}
export PATH=$PATH:/usr/sbin:/sbin
MARK="# megatron-pma-slurm"
CONF_LINK=/etc/slurm/slurm.conf
QUIET=0; KEEP=0
for a in "$@"; do
    case $a in
        --quiet) QUIET=1 ;;
        --keep-dir) KEEP=1 ;;
        *) echo "slurm_down: unknown argument $a" >&2; exit 2 ;;
    esac
done
log() { [ $QUIET = 1 ] || echo "slurm_down: $*"; }

[ "$(id -u)" = 0 ] || { echo "slurm_down: needs root (it stops root daemons and edits /etc/hosts)" >&2; exit 1; }

# Cancel what is still queued or running, so that slurmd does not leave job processes behind.
if [ -s "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    timeout 5 scancel --full --quiet --user=root >/dev/null 2>&1 || true
    timeout 5 scancel --quiet --state=PENDING >/dev/null 2>&1 || true
fi

# stop_pidfiles NAME=FILE...: SIGTERM to all at once, wait up to 10 s, then SIGKILL what is left.
stop_pidfiles() {
    local spec f name pid pids=() names=()
    for spec in "$@"; do
        name=${spec%%=*}; f=${spec#*=}
        [ -s "$f" ] || continue
        pid=$(cat "$f"); rm -f "$f"
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null && { pids+=("$pid"); names+=("$name"); }
    done
    local i alive
    for _ in $(seq 1 100); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 1 ] || break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            kill -KILL "${pids[$i]}" 2>/dev/null; log "killed ${names[$i]} (${pids[$i]})"
        else
            log "stopped ${names[$i]} (${pids[$i]})"
        fi
    done
}

specs=()
for f in "$DIR"/run/slurmd-*.pid; do
    [ -e "$f" ] && specs+=("$(basename "$f" .pid)=$f")
done
stop_pidfiles "${specs[@]}" "slurmctld=$DIR/run/slurmctld.pid"
stop_pidfiles "munged=$DIR/munge/munged.pid"

# /etc/slurm/slurm.conf: remove only our symlink.
if [ -L "$CONF_LINK" ] && [ "$(readlink "$CONF_LINK")" = "$DIR/etc/slurm.conf" ]; then
    rm -f "$CONF_LINK"
fi

# /etc/hosts: drop our marked line, written in place (it may be a bind mount).
if grep -q "$MARK" /etc/hosts 2>/dev/null; then
    tmp=$(mktemp)
    grep -v "$MARK" /etc/hosts > "$tmp"
    cat "$tmp" > /etc/hosts
    rm -f "$tmp"
    log "restored /etc/hosts"
fi

if [ $KEEP = 0 ] && [ -d "$DIR" ]; then
    rm -rf "$DIR"
fi
log "down"
exit 0
