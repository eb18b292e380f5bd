#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh in STATE_DIR.
#
#   tests/slurm/stop_cluster.sh [STATE_DIR]     (or: SLURM_TEST_DIR=... stop_cluster.sh)
#
# Cancels the cluster's remaining jobs (so no job processes outlive it), then
# stops exactly the daemons recorded in STATE_DIR/run/{slurmd,slurmctld,munged}.pid
# (SIGTERM, then SIGKILL after a grace period). A pid is only signalled if that
# process is the expected daemon (its command name matches), so a stale pid
# file can never hit an unrelated process. Nothing else is touched; the state
# directory is kept (logs) - delete it yourself. Safe to run more than once.
set -uo pipefail

DIR="${1:-${SLURM_TEST_DIR:-}}"
if [[ -z "$DIR" ]]; then
    echo "usage: $0 STATE_DIR   (or set SLURM_TEST_DIR)" >&2
    exit 2
fi
log() { echo "[stop_cluster] $*" >&2; }
if [[ ! -d "$DIR" ]]; then
    log "no such directory: $DIR (nothing to stop)"
    exit 0
fi
DIR="$(cd "$DIR" && pwd -P)"
for d in /usr/sbin /sbin; do [[ ":$PATH:" == *":$d:"* ]] || PATH="$PATH:$d"; done
export SLURM_CONF="$DIR/slurm.conf"

# pid from the pid file if it is alive *and* its command name is $2
daemon_pid() {
    local pf="$DIR/run/$1.pid" pid comm
    [[ -s "$pf" ]] || return 0
    pid="$(tr -dc '0-9' <"$pf")"
    [[ -n "$pid" ]] || return 0
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 0
    [[ "$comm" == "$2" ]] && echo "$pid"
    return 0
}

# alive and not a zombie waiting to be reaped
alive() {
    local st
    kill -0 "$1" 2>/dev/null || return 1
    st="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

# 1. cancel this cluster's jobs while slurmctld/slurmd are still up
if [[ -n "$(daemon_pid slurmctld slurmctld)" ]] && command -v scancel >/dev/null 2>&1; then
    if [[ -n "$(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ]]; then
        log "cancelling remaining jobs"
        timeout 10 scancel --full --user="$(id -un)" >/dev/null 2>&1 || true
        for _ in $(seq 30); do
            [[ -z "$(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ]] && break
            sleep 1
        done
    fi
fi

# 2. stop the daemons: slurmd, slurmctld, then munged (both need munge)
rc=0
for name in slurmd slurmctld munged; do
    pid="$(daemon_pid "$name" "$name")"
    if [[ -z "$pid" ]]; then
        rm -f "$DIR/run/$name.pid"
        continue
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        log "$name ($pid) ignored SIGTERM for 10 s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
    if alive "$pid"; then
        log "could not stop $name ($pid)"
        rc=1
    else
        log "stopped $name ($pid)"
        rm -f "$DIR/run/$name.pid"
    fi
done
exit "$rc"
