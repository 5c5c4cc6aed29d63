#!/usr/bin/env bash
# A single-node Slurm cluster for the tests: munged, slurmctld and slurmd as
# background daemons, configured by a generated slurm.conf, all state under
# $H5BANK_SLURM_DIR (default /tmp/h5bank-slurm). Nothing is written to
# /etc/slurm: clients find the configuration through SLURM_CONF.
#
#   bash tests/slurm.sh up       install the packages if missing (root, apt), start, wait until ready
#   bash tests/slurm.sh down     cancel jobs, stop the daemons this script started (by PID)
#   bash tests/slurm.sh status   exit 0 when this script's cluster answers
#   bash tests/slurm.sh env      print `export SLURM_CONF=...`
#
# The settings avoid the pitfalls measured on these machines: no cgroup
# plugins (in a container jobs would report COMPLETED without running),
# proctrack/linuxproc, no scheduling delay, partition limits enforced at
# submit time (an oversized job fails at once instead of pending for ever).
# A failed `up` stops whatever it started before exiting.
set -euo pipefail

DIR="${H5BANK_SLURM_DIR:-/tmp/h5bank-slurm}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

say() { echo "slurm.sh: $*" >&2; }

# A pid is alive when /proc has it and it is not a zombie (PID 1 here reaps lazily).
alive() {
    local pid="$1" stat
    [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
    stat="$(cat "/proc/$pid/stat" 2>/dev/null)" || return 1
    [ "$(echo "${stat##*) }" | cut -d' ' -f1)" != Z ]
}

# Stop the daemon whose pid file is $1 if its command name is $2; wait until it is gone.
stop_pid() {
    local file="$1" name="$2" pid i
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        alive "$pid" && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "Slurm is not installed and this is not root with apt-get: install slurmctld slurmd slurm-client munge"
        exit 3
    fi
    say "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is running and answers: reuse it
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force
    local i
    for i in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && { echo started > "$DIR/munged.ours"; return 0; }
        sleep 0.1
    done
    say "munged did not answer (see /var/log/munge/munged.log)"
    exit 1
}

write_conf() {
    # CPUs, topology and memory as slurmd detects them (RealMemory above the
    # detected memory would mark the node invalid).
    local hw cpus sockets cores threads mem
    hw="$(slurmd -C | head -1)"
    cpus="$(echo "$hw" | tr ' ' '\n' | awk -F= '$1=="CPUs"{print $2}')"
    sockets="$(echo "$hw" | tr ' ' '\n' | awk -F= '$1=="SocketsPerBoard"||$1=="Sockets"{print $2; exit}')"
    cores="$(echo "$hw" | tr ' ' '\n' | awk -F= '$1=="CoresPerSocket"{print $2}')"
    threads="$(echo "$hw" | tr ' ' '\n' | awk -F= '$1=="ThreadsPerCore"{print $2}')"
    mem="$(echo "$hw" | tr ' ' '\n' | awk -F= '$1=="RealMemory"{print $2}')"
    mem=$((mem > 2048 ? mem - 1024 : mem))
    cat > "$CONF" <<EOF
# written by h5bank tests/slurm.sh
ClusterName=h5bank-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
EnforcePartLimits=ALL
SlurmdTimeout=30
KillWait=5
MinJobAge=300

NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus Sockets=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
    install_packages
    if status 2>/dev/null; then
        down  # restart from clean state: stale jobs and spool would confuse the tests
    fi
    trap 'say "bring-up failed: stopping what it started"; down' ERR EXIT
    mkdir -p "$DIR"/{ctld,d,log}
    start_munge
    write_conf
    local i
    slurmctld -c -f "$CONF"
    for i in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
    scontrol ping | grep -q 'is UP' || { say "slurmctld did not come up:"; tail -5 "$DIR/log/slurmctld.log" >&2; exit 1; }
    slurmd -N localhost -f "$CONF"
    for i in $(seq 100); do [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] && break; sleep 0.1; done
    if [ "$(sinfo -h -n localhost -o %T)" != idle ]; then
        say "node localhost is not idle: $(sinfo -h -n localhost -o '%T %E')"
        tail -5 "$DIR/log/slurmd.log" >&2
        exit 1
    fi
    trap - ERR EXIT
    say "up: $(sinfo -h -o '%P %a %D %T %c CPUs %m MB') (SLURM_CONF=$CONF)"
}

down() {
    if [ -f "$DIR/slurmctld.pid" ] && alive "$(cat "$DIR/slurmctld.pid")"; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    stop_pid "$DIR/slurmd.pid" slurmd
    stop_pid "$DIR/slurmctld.pid" slurmctld
    if [ -f "$DIR/munged.ours" ]; then
        stop_pid /run/munge/munged.pid munged
    fi
    rm -rf "$DIR"
}

status() {
    [ -f "$CONF" ] && [ -f "$DIR/slurmctld.pid" ] && alive "$(cat "$DIR/slurmctld.pid")" \
        && [ -f "$DIR/slurmd.pid" ] && alive "$(cat "$DIR/slurmd.pid")" \
        && scontrol ping 2>/dev/null | grep -q 'is UP'
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
