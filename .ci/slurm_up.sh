#!/usr/bin/env bash
# Bring up a real, one-machine Slurm cluster with two emulated nodes (n1, n2) for tests/slurm/.
#
#   sudo .ci/slurm_up.sh        # idempotent: a healthy cluster is left as it is
#   sudo .ci/slurm_down.sh      # stop it, restore /etc/hosts and /etc/slurm/slurm.conf
#
# Needs root and Debian's Slurm 22.05 packages (installed here when missing: slurmctld slurmd
# slurm-client munge). No systemd is used: munged, slurmctld and two slurmd (multiple-slurmd, one per
# emulated node) are started directly, with their config, state, spool, logs and pid files under
# $SLURM_CI_DIR (default /tmp/megatron-pma-slurm). The commands find the config through a symlink
# /etc/slurm/slurm.conf -> $SLURM_CI_DIR/etc/slurm.conf (removed again by slurm_down.sh), so sbatch,
# squeue, ... work from any shell without SLURM_CONF. Both node names resolve to 127.0.0.1 through one
# marked line in /etc/hosts.
#
# Knobs: SLURM_CI_DIR, SLURM_CI_AUTH (munge | none; default munge), SLURM_CI_CPUS (CPUs each emulated
# node advertises; default 4, so that 2 nodes x 2 tasks fit on a 2-core machine),
# SLURM_CI_CTLD_PORT (default 16817), SLURM_CI_SLURMD_PORTS (default 17001-17002).
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/megatron-pma-slurm}
export PATH=$PATH:/usr/sbin:/sbin
AUTH=${SLURM_CI_AUTH:-munge}
CPUS=${SLURM_CI_CPUS:-4}
CTLD_PORT=${SLURM_CI_CTLD_PORT:-16817}
SLURMD_PORTS=${SLURM_CI_SLURMD_PORTS:-17001-17002}
MARK="# megatron-pma-slurm"
NODES=(n1 n2)
CONF_LINK=/etc/slurm/slurm.conf

die() { echo "slurm_up: $*" >&2; exit 1; }
log() { echo "slurm_up: $*"; }

[ "$(id -u)" = 0 ] || die "needs root (it installs packages, starts daemons and edits /etc/hosts); run it with sudo"

# --- packages ---------------------------------------------------------------------------------
need_pkgs=()
for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${cmd%%:*}" >/dev/null 2>&1 || need_pkgs+=("${cmd##*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and apt-get is unavailable (need: ${need_pkgs[*]})"
    log "installing ${need_pkgs[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed: cannot install ${need_pkgs[*]}"
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
        || die "apt-get install slurmctld slurmd slurm-client munge failed (no Debian mirror reachable?)"
    for c in slurmctld slurmd sbatch sinfo; do
        command -v "$c" >/dev/null 2>&1 || die "'$c' still missing after apt-get install"
    done
fi
[ "$AUTH" != munge ] || command -v munged >/dev/null 2>&1 || die "munged is missing (apt-get install munge), or use SLURM_CI_AUTH=none"

# --- already up? --------------------------------------------------------------------------------
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

cluster_healthy() {
    local f
    for f in "$DIR/run/slurmctld.pid" "$DIR/run/slurmd-n1.pid" "$DIR/run/slurmd-n2.pid"; do
        pid_alive "$f" || return 1
    done
    [ "$AUTH" != munge ] || pid_alive "$DIR/munge/munged.pid" || return 1
    [ "$(readlink -f "$CONF_LINK" 2>/dev/null)" = "$DIR/etc/slurm.conf" ] || return 1
    grep -q "$MARK" /etc/hosts || return 1
    local n
    # responding nodes that are not down/drained/failed (busy or completing nodes are fine)
    n=$(timeout 5 sinfo -h -N -r -o '%N %t' 2>/dev/null | grep -Ev ' (down|drain|drng|fail|maint|unk)' \
        | awk '{print $1}' | sort -u | wc -l) || return 1
    [ "$n" = 2 ]
}

if cluster_healthy; then
    log "already up ($DIR)"
    sinfo
    exit 0
fi

# A half-started or stale cluster: take it down first (same paths), then start clean.
if [ -d "$DIR" ] || [ -L "$CONF_LINK" ]; then
    SLURM_CI_DIR=$DIR "$(dirname "$0")/slurm_down.sh" --quiet || true
fi

if [ -e "$CONF_LINK" ] && [ "$(readlink -f "$CONF_LINK")" != "$DIR/etc/slurm.conf" ]; then
    die "$CONF_LINK exists and is not ours: this machine already has a Slurm configuration; refusing to replace it"
fi

T0=$(date +%s.%N)
mkdir -p "$DIR"/{etc,state,run,log,spool/n1,spool/n2}
chmod 755 "$DIR"

# --- munge ----------------------------------------------------------------------------------------
if [ "$AUTH" = munge ]; then
    getent passwd munge >/dev/null || die "user 'munge' does not exist (is the munge package installed?)"
    # Our own key (in a private dir), so that nothing outside $DIR is touched; the socket dir must be
    # reachable by every user that runs slurm commands.
    mkdir -p "$DIR/munge/key"
    head -c 1024 /dev/urandom > "$DIR/munge/key/munge.key"
    chown -R munge: "$DIR/munge"
    chmod 755 "$DIR/munge"
    chmod 700 "$DIR/munge/key"
    chmod 400 "$DIR/munge/key/munge.key"
    runuser -u munge -- munged \
        --key-file="$DIR/munge/key/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start (see $DIR/munge/munged.log)"
    AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket"
else
    AUTH_LINES="AuthType=auth/none
CredType=cred/none"
fi

# --- slurm.conf -------------------------------------------------------------------------------------
HOST=$(hostname -s)
# Advertise a little less memory than the machine has, else slurmd drains the node.
MEM_MB=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
MEM_MB=${MEM_MB:-2048}
MEM_MB=$(( MEM_MB > 2048 ? MEM_MB - 1024 : MEM_MB / 2 ))

cat > "$DIR/etc/slurm.conf" <<EOF
# Generated by megatron-pma .ci/slurm_up.sh: one machine, two emulated nodes. Do not edit.
ClusterName=pmaci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
$AUTH_LINES
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmdTimeout=300
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$SLURMD_PORTS CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# plugstack.conf from the package (spank plugins, e.g. pyxis) is left as it is.
mkdir -p /etc/slurm
ln -sfn "$DIR/etc/slurm.conf" "$CONF_LINK"

# --- /etc/hosts: n1, n2 -> 127.0.0.1 (written in place: /etc/hosts may be a bind mount) ----------------
if ! grep -q "$MARK" /etc/hosts; then
    cp /etc/hosts "$DIR/hosts.orig"
    printf '127.0.0.1 %s %s\n' "${NODES[*]}" "$MARK" >> /etc/hosts \
        || die "cannot write /etc/hosts (read-only?): the node names ${NODES[*]} must resolve to 127.0.0.1"
fi

# --- daemons -------------------------------------------------------------------------------------
slurmctld -i >"$DIR/log/slurmctld.stdout" 2>&1 || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
for n in "${NODES[@]}"; do
    slurmd -N "$n" >"$DIR/log/slurmd-$n.stdout" 2>&1 || die "slurmd -N $n did not start (see $DIR/log/slurmd-$n.log)"
done

# --- wait until both nodes are idle ---------------------------------------------------------------
ok=0
for _ in $(seq 1 150); do
    n=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)
    if [ "$n" = 2 ]; then ok=1; break; fi
    sleep 0.2
done
if [ $ok != 1 ]; then
    sinfo -N -l >&2 || true
    tail -n 20 "$DIR/log/slurmctld.log" >&2 || true
    die "the nodes did not become idle within 30 s (logs in $DIR/log)"
fi
T1=$(date +%s.%N)
log "up in $(awk "BEGIN{printf \"%.1f\", $T1-$T0}") s (config, state and logs in $DIR)"
sinfo
