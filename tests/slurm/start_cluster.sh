#!/usr/bin/env bash
# Start a throw-away, single-node SLURM cluster on this machine for tests.
#
#   tests/slurm/start_cluster.sh [STATE_DIR]      (or: SLURM_TEST_DIR=... start_cluster.sh)
#
# * Must run as root. Installs Debian's slurm-wlm + munge with apt-get if
#   `slurmctld` (or slurmd/munged/sbatch) is missing; nothing else is installed.
# * Writes slurm.conf / gres.conf / cgroup.conf into STATE_DIR from the
#   templates next to this script (slurm.conf.in, gres.conf.in, cgroup.conf).
#   One node (NodeName = `hostname -s`, NodeAddr 127.0.0.1) with all CPUs,
#   ~80 % of RAM and *fake* GPUs (gres.conf: AutoDetect=off, File=/dev/null),
#   in two partitions: `cpu` (default) and `gpu`. Sizes can be overridden:
#   SLURM_TEST_CPUS, SLURM_TEST_REALMEMORY (MB), SLURM_TEST_GPUS (default 1).
# * Runs its own munged (private key + socket under STATE_DIR, so it neither
#   needs nor touches a system munge), slurmctld and slurmd as root,
#   daemonized, with pid files under STATE_DIR/run. Ports are picked free.
# * Waits (SLURM_TEST_START_TIMEOUT, default 60 s) until `sinfo` reports the
#   node idle. On failure prints the daemons' log tails, stops the cluster
#   (stop_cluster.sh) if it started any daemon, and exits non-zero.
# * Idempotent: daemons whose pid file points at a live process are left
#   alone and their configuration is reused.
#
# On success it writes STATE_DIR/env.sh (`export SLURM_CONF=...` and
# STATE_DIR/bin, wrappers of the client commands pinned to this cluster, first
# in PATH); source it before using sinfo/sbatch/srun/snakemake.
# The last two lines on stdout are `SLURM_CONF=<path>` and `SLURM_BIN=<dir>`.
# Stop the cluster with tests/slurm/stop_cluster.sh STATE_DIR.
#
# Exit codes: 0 ok; 2 usage; 3 prerequisites missing and not installable
# (not root, apt-get unavailable/failing): callers may treat 3 as "skip";
# 1 any other failure (daemon did not start, node not idle in time).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${1:-${SLURM_TEST_DIR:-}}"
if [[ -z "$DIR" ]]; then
    echo "usage: $0 STATE_DIR   (or set SLURM_TEST_DIR)" >&2
    exit 2
fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd -P)"
TIMEOUT="${SLURM_TEST_START_TIMEOUT:-60}"

log() { echo "[start_cluster] $*" >&2; }
STARTED=()  # daemons started by this invocation
die() {
    local rc="$1"
    shift
    log "ERROR: $*"
    diagnostics
    # Leave nothing half-started behind (logs stay in STATE_DIR).
    if ((${#STARTED[@]})); then
        log "stopping the cluster (this run started: ${STARTED[*]})"
        "$HERE/stop_cluster.sh" "$DIR" 9>&- || true
    fi
    exit "$rc"
}

diagnostics() {
    local f
    for f in "$DIR"/log/munged.log "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log \
             "$DIR"/log/slurmctld.stderr "$DIR"/log/slurmd.stderr "$DIR"/log/munged.stderr \
             "$DIR"/log/apt.log; do
        [[ -s "$f" ]] || continue
        echo "----- tail -n 30 $f -----" >&2
        tail -n 30 "$f" >&2 || true
    done
    if [[ -f "$DIR/slurm.conf" ]] && command -v sinfo >/dev/null 2>&1; then
        echo "----- sinfo -----" >&2
        SLURM_CONF="$DIR/slurm.conf" timeout 10 sinfo -N -l >&2 2>&1 || true
        SLURM_CONF="$DIR/slurm.conf" timeout 10 scontrol show node >&2 2>&1 || true
    fi
}

# pid from a pid file if that process is alive, else empty. A dead daemon
# may linger as a zombie (in containers PID 1 often does not reap), so
# kill -0 alone is not enough.
live_pid() {
    local pf="$1" pid st
    [[ -s "$pf" ]] || return 0
    pid="$(tr -dc '0-9' <"$pf")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    st="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" || return 0
    [[ -n "$st" && "$st" != Z && "$st" != X ]] && echo "$pid"
    return 0
}

# ---------------------------------------------------------------- install --
install_slurm() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "slurmctld not found and apt-get unavailable: cannot install slurm-wlm/munge"
        exit 3
    fi
    mkdir -p "$DIR/log"
    log "installing slurm-wlm and munge with apt-get (log: $DIR/log/apt.log)"
    # Keep the packages' init scripts from starting system-wide daemons
    # (we run our own, private ones). Only if no policy is in place already.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get -q -o DPkg::Lock::Timeout=300 update &&
            apt-get -q -y -o DPkg::Lock::Timeout=300 install --no-install-recommends \
                slurm-wlm munge
    } >>"$DIR/log/apt.log" 2>&1 || rc=$?
    [[ "$own_policy" == 1 ]] && rm -f "$policy"
    if [[ "$rc" != 0 ]] || ! command -v slurmctld >/dev/null 2>&1; then
        tail -n 30 "$DIR/log/apt.log" >&2 || true
        log "apt-get failed (rc=$rc)"
        exit 3
    fi
}

if [[ "$(id -u)" != 0 ]]; then
    log "must run as root (slurmd launches jobs as root on this test cluster)"
    exit 3
fi
for d in /usr/sbin /sbin; do [[ ":$PATH:" == *":$d:"* ]] || PATH="$PATH:$d"; done
export PATH
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 ||
    ! command -v munged >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    install_slurm
fi

mkdir -p "$DIR"/{run,log,state,spool/slurmd,munge}
# munged wants the socket directory traversable by all; the key stays 0400.
chmod 711 "$DIR/munge"
exec 9>"$DIR/.start.lock"
flock -w 120 9 || die 1 "another start_cluster.sh holds $DIR/.start.lock"

MUNGE_SOCKET="$DIR/munge/munge.socket"
CONF="$DIR/slurm.conf"

# ------------------------------------------------------------------ config --
port_in_use() { ss -Htln 2>/dev/null | awk '{print $4}' | grep -Eq "[:.]$1\$"; }
free_port() {  # free_port START [EXCLUDE]
    local p="$1"
    while port_in_use "$p" || [[ "$p" == "${2:-}" ]]; do p=$((p + 1)); done
    echo "$p"
}

if [[ -n "$(live_pid "$DIR/run/slurmctld.pid")" || -n "$(live_pid "$DIR/run/slurmd.pid")" ]] &&
    [[ -f "$CONF" ]]; then
    log "daemons already running for $DIR: reusing $CONF"
else
    NODE="$(hostname -s)"
    NCPU="${SLURM_TEST_CPUS:-$(nproc)}"
    NGPU="${SLURM_TEST_GPUS:-1}"
    MEM_MB=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024}' /proc/meminfo)
    REAL_MB="${SLURM_TEST_REALMEMORY:-$((MEM_MB * 8 / 10))}"
    # Pick ports from a per-directory pseudo-random base to limit collisions
    # between concurrent test clusters on the same host.
    base=$((20000 + $(printf '%s' "$DIR" | cksum | cut -d' ' -f1) % 20000))
    CTLD_PORT="${SLURM_TEST_CTLD_PORT:-$(free_port "$base")}"
    SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-$(free_port $((CTLD_PORT + 1)) "$CTLD_PORT")}"
    # Cluster names must be unique per StateSaveLocation only; keep it short.
    CLUSTER="emtest$(printf '%s' "$DIR" | cksum | cut -c1-5)"
    sed -e "s|@DIR@|$DIR|g" -e "s|@NODE@|$NODE|g" -e "s|@CPUS@|$NCPU|g" -e "s|@GPUS@|$NGPU|g" \
        -e "s|@REALMEM@|$REAL_MB|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" \
        "$HERE/slurm.conf.in" >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    # Fake GPUs: /dev/null itself for one, symlinks to it for more
    # (device index = number in the file name, as with /dev/nvidiaN).
    if ((NGPU == 1)); then
        GPU_FILES=/dev/null
    else
        mkdir -p "$DIR/dev"
        for ((i = 0; i < NGPU; i++)); do ln -sfn /dev/null "$DIR/dev/fakegpu$i"; done
        GPU_FILES="$DIR/dev/fakegpu[0-$((NGPU - 1))]"
    fi
    sed -e "s|@GPU_FILES@|$GPU_FILES|g" -e "s|@GPUS@|$NGPU|g" "$HERE/gres.conf.in" >"$DIR/gres.conf"
    cp "$HERE/cgroup.conf" "$DIR/cgroup.conf"
    log "wrote $CONF (node $NODE, CPUs=$NCPU, RealMemory=$REAL_MB, gpu:$NGPU, ports $CTLD_PORT/$SLURMD_PORT)"
fi
export SLURM_CONF="$CONF"

# Client wrappers in STATE_DIR/bin that always use this cluster's config.
# Needed because SLURM_CONF does not survive everywhere: the Snakemake
# slurm-jobstep plugin strips all SLURM_* variables (SLURM_CONF included)
# before its nested `srun`, which then looks for /etc/slurm/slurm.conf.
# Real clusters keep their config at the default path (or run configless);
# this private one cannot, so put STATE_DIR/bin first in PATH (env.sh does).
mkdir -p "$DIR/bin"
for tool in sbatch srun salloc squeue scontrol scancel sinfo sacct sstat sprio sshare; do
    real="$(command -v "$tool" 2>/dev/null)" || continue
    [[ "$real" == "$DIR/bin/$tool" ]] && continue
    printf '#!/bin/sh\n# generated by start_cluster.sh\nSLURM_CONF=%q exec %q "$@"\n' \
        "$CONF" "$real" >"$DIR/bin/$tool"
    chmod 755 "$DIR/bin/$tool"
done

# ------------------------------------------------------------------ munge --
if [[ -z "$(live_pid "$DIR/run/munged.pid")" ]]; then
    if [[ ! -s "$DIR/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
        chmod 400 "$DIR/munge/munge.key"
    fi
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: run as root and with the key in a private (non-/etc) directory.
    : >"$DIR/log/munged.log"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$DIR/munge/munge.seed" \
        >"$DIR/log/munged.stderr" 2>&1 9>&- ||
        die 1 "munged failed to start"
    STARTED+=(munged)
    for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
fi
if ! munge --socket="$MUNGE_SOCKET" -n </dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1; then
    die 1 "munge round trip via $MUNGE_SOCKET failed"
fi

# ------------------------------------------------------------------ slurm --
if [[ -z "$(live_pid "$DIR/run/slurmctld.pid")" ]]; then
    # -c: start from a clean state (no jobs/nodes from an earlier run).
    : >"$DIR/log/slurmctld.log"
    STARTED+=(slurmctld)
    slurmctld -c -f "$CONF" >"$DIR/log/slurmctld.stderr" 2>&1 9>&- || die 1 "slurmctld failed to start"
fi
if [[ -z "$(live_pid "$DIR/run/slurmd.pid")" ]]; then
    : >"$DIR/log/slurmd.log"
    STARTED+=(slurmd)
    slurmd -f "$CONF" >"$DIR/log/slurmd.stderr" 2>&1 9>&- || die 1 "slurmd failed to start"
fi

# ---------------------------------------------------------- wait for idle --
start=$SECONDS
state=""
while ((SECONDS - start < TIMEOUT)); do
    for d in munged slurmctld slurmd; do
        [[ -n "$(live_pid "$DIR/run/$d.pid")" ]] || die 1 "$d is not running (see its log below)"
    done
    state="$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    case "$state" in
    *idle* | *mixed* | *alloc*) break ;;
    esac
    # A node that came up "down"/"drained" after a restart may be resumed.
    if [[ "$state" == *down* || "$state" == *drain* ]] && ((SECONDS - start > 5)); then
        timeout 10 scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
done
case "$state" in
*idle* | *mixed* | *alloc*) ;;
*) die 1 "node not idle after ${TIMEOUT}s (sinfo state: '${state:-none}')" ;;
esac

# shellcheck disable=SC2016  # $PATH is meant to expand when env.sh is sourced
printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$CONF" "$DIR/bin" >"$DIR/env.sh"
log "cluster up in $((SECONDS - start))s after daemon start (state: ${state% })"
timeout 10 sinfo >&2 || true
echo "SLURM_CONF=$CONF"
echo "SLURM_BIN=$DIR/bin"
