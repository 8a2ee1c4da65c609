#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for CI and for trying the sbatch scripts in examples/slurm/.
#
#   bash .ci/slurm.sh install   # apt-get install slurmctld slurmd slurm-client munge (if missing)
#   bash .ci/slurm.sh start     # write the config, start munged, slurmctld, slurmd; wait for the node
#   bash .ci/slurm.sh status    # which daemons run, and sinfo (exit 0 when the node is usable)
#   bash .ci/slurm.sh stop      # stop the daemons by the PIDs in their pid files
#
# Runs as root, without systemd (containers, CI runners); every subcommand is safe to repeat.
# State lives where Debian's packages (SLURM 22.05) expect it:
#   /etc/slurm/slurm.conf                            configuration (written by `start`; no
#                                                    cgroup.conf: nothing here uses cgroups)
#   /etc/munge/munge.key                             munge key (created if missing)
#   /var/spool/slurmctld, /var/spool/slurmd          controller state, node spool
#   /var/log/slurm/slurmctld.log, slurmd.log         daemon logs; /var/log/munge/munged.log
#   /run/slurmctld.pid, /run/slurmd.pid, /run/munge/munged.pid   pid files (`stop` uses these)
# The node is `localhost` with CPUs=$(nproc) and RealMemory=1024; accounting is off, so read job
# results with `scontrol show job -o ID` (sacct would need slurmdbd).
# Environment: SIP_SLURM_START_TIMEOUT (seconds to wait for the node, default 60),
# SIP_SLURM_OVERWRITE_CONF=1 (replace a slurm.conf that this script did not write).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
PACKAGES=(slurmctld slurmd slurm-client munge)
MARKER="# Written by megatron-sip .ci/slurm.sh"
START_TIMEOUT=${SIP_SLURM_START_TIMEOUT:-60}

log() { echo "slurm.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

need_root() {
    [[ $(id -u) == 0 ]] || die "'$1' must run as root (it installs packages / starts system daemons)"
}

# PID from a pid file if that process is alive, else nothing.
live_pid() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' <"$1")
    [[ -n $pid ]] && alive "$pid" && echo "$pid"
}

# Running and not a zombie (a container's init may not reap the daemons' forked parents).
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sinfo >/dev/null && command -v munged >/dev/null
}

cmd_install() {
    if installed; then
        log "SLURM and munge already installed ($(slurmd -V))"
        return 0
    fi
    need_root install
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet (or stale ones): update only when needed.
    local policy
    policy=$(apt-cache policy slurmd 2>/dev/null || true)
    if [[ $policy != *"Candidate: "[0-9]* ]]; then
        log "apt-get update"
        apt-get update -qq
    fi
    log "apt-get install ${PACKAGES[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; then
        log "install failed; retrying after apt-get update"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    fi
    installed || die "packages installed but slurmctld/slurmd/sinfo/munged are not on PATH"
    log "installed $(slurmd -V)"
}

write_config() {
    local cpus tmp
    cpus=$(nproc)
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF" && [[ ${SIP_SLURM_OVERWRITE_CONF:-0} != 1 ]]; then
        die "$CONF exists and was not written by this script; move it away or set SIP_SLURM_OVERWRITE_CONF=1"
    fi
    mkdir -p "$CONF_DIR"
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER: a one-node cluster on localhost.
ClusterName=sip-local
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd / cgroup delegation here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
# Accounting off (no slurmdbd): read results with scontrol show job -o.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Allocate single CPUs, so several small jobs can share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# A node that restarts comes back to service on its own; finished jobs stay visible for 10 min.
ReturnToService=2
MinJobAge=600
SlurmdTimeout=60
SlurmdParameters=config_overrides
NodeName=localhost CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$tmp"
    mv -f "$tmp" "$CONF"
}

prepare_dirs() {
    id slurm >/dev/null 2>&1 || die "user 'slurm' missing: run '$0 install' first"
    id munge >/dev/null 2>&1 || die "user 'munge' missing: run '$0 install' first"
    install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    install -d -o slurm -g slurm -m 0755 "$LOG_DIR" "$CTLD_SPOOL"
    install -d -o root -g root -m 0755 "$SLURMD_SPOOL"
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile "$MUNGE_KEY" --force
        else
            dd if=/dev/urandom bs=1 count=1024 of="$MUNGE_KEY" status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
}

node_state() {
    sinfo -h -N -n localhost -o '%t' 2>/dev/null | head -n 1
}

# States in which the node takes jobs (idle, or running some already).
node_usable() {
    case "$(node_state)" in
    idle | mix | alloc | comp) return 0 ;;
    *) return 1 ;;
    esac
}

start_daemon() { # name pidfile command...
    local name=$1 pidfile=$2
    shift 2
    if live_pid "$pidfile" >/dev/null; then
        log "$name already running (pid $(live_pid "$pidfile"))"
        return 0
    fi
    rm -f "$pidfile"
    "$@" || die "$name failed to start; see its log under $LOG_DIR or /var/log/munge"
    for _ in $(seq 1 50); do
        live_pid "$pidfile" >/dev/null && {
            log "$name started (pid $(live_pid "$pidfile"))"
            return 0
        }
        sleep 0.1
    done
    die "$name did not write $pidfile; see its log under $LOG_DIR or /var/log/munge"
}

cmd_start() {
    need_root start
    installed || die "SLURM is not installed: run '$0 install' first"
    local running=1 f
    for f in "$MUNGE_PID" "$CTLD_PID" "$SLURMD_PID"; do
        live_pid "$f" >/dev/null || running=0
    done
    if ((running)) && node_usable; then
        log "already running; node localhost is $(node_state)"
        return 0
    fi
    # Rewrite the config only while the SLURM daemons are down (they read it at start).
    if ! live_pid "$CTLD_PID" >/dev/null && ! live_pid "$SLURMD_PID" >/dev/null; then
        write_config
    fi
    prepare_dirs
    start_daemon munged "$MUNGE_PID" runuser -u munge -- munged
    start_daemon slurmctld "$CTLD_PID" slurmctld
    start_daemon slurmd "$SLURMD_PID" slurmd -N localhost
    local deadline=$((SECONDS + START_TIMEOUT)) state resumed=0
    while ((SECONDS < deadline)); do
        state=$(node_state)
        if node_usable; then
            log "node localhost is $state"
            sinfo
            return 0
        fi
        # A node left down/drained by an earlier run: put it back in service once.
        if ((!resumed)) && [[ $state == down* || $state == drain* ]]; then
            scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node localhost not idle after ${START_TIMEOUT}s (state: ${state:-none})"
}

stop_daemon() { # name pidfile
    local name=$1 pidfile=$2 pid
    if ! pid=$(live_pid "$pidfile"); then
        rm -f "$pidfile"
        log "$name not running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
    log "$name stopped (pid $pid)"
}

cmd_stop() {
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    stop_daemon munged "$MUNGE_PID"
}

cmd_status() {
    local rc=0 f name pid
    for f in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        name=${f%%:*}
        if pid=$(live_pid "${f#*:}"); then
            echo "$name: running (pid $pid)"
        else
            echo "$name: stopped"
            rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo -N -l || rc=3
        node_usable || rc=3
    fi
    return $rc
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 {install|start|stop|status}" >&2
    exit 2
    ;;
esac
