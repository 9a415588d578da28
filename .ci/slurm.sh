#!/usr/bin/env bash
# A single-node SLURM on this machine, for trying the job scripts locally and for CI.
#
#   .ci/slurm.sh install   # apt-get install Debian's slurm-wlm, munge and libpmix-dev (once; root)
#   .ci/slurm.sh start     # write the config, start munged, slurmctld, slurmd; wait until idle
#   .ci/slurm.sh status    # exit 0 when the controller answers and the node is up
#   .ci/slurm.sh stop      # cancel every job, stop the three daemons by their PID files
#
# Runs as root, without systemd. Everything it writes lives in $MPIPUB_SLURM_DIR
# (/var/tmp/mpipub-slurm) except the config, which goes where sbatch/srun look for it,
# /etc/slurm/slurm.conf (it refuses to replace a config it did not write). Each start begins
# a fresh cluster (no jobs kept from an earlier one, job ids from 1). Daemons are stopped
# by the PIDs in their PID files, never by name. Finished jobs are listed, one line each with
# JobState and ExitCode, in $MPIPUB_SLURM_DIR/jobcomp.txt (the tests read it: `sbatch --wait`
# returns 0 even for a cancelled job).
set -euo pipefail

DIR=${MPIPUB_SLURM_DIR:-/var/tmp/mpipub-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by mpipub .ci/slurm.sh"
NODE=$(hostname -s)
# Declared CPUs: more than the real cores so that 5-10 rank jobs start (they oversubscribe).
CPUS=${MPIPUB_SLURM_CPUS:-16}
START_TIMEOUT_S=60

say() { echo "slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null && ldconfig -p | grep 'libpmix\.so ' >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "no apt-get: install SLURM (slurmctld, slurmd, sbatch) and munge by hand"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d (Docker images have one) keeps the packages from starting their daemons.
  # libpmix-dev: SLURM's pmix plugin (srun --mpi=pmix, what Open MPI 5 needs) loads libpmix.so,
  # which only the -dev package provides; without it `srun --mpi=pmix` says "Invalid MPI type".
  apt-get install -y -qq --no-install-recommends slurm-wlm munge libpmix-dev >/dev/null
}

write_config() {
  if [[ -e $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not replacing it"
  fi
  mkdir -p "$(dirname "$CONF")" "$DIR/state" "$DIR/spool"
  cat >"$CONF" <<EOF
$MARK (remove with: .ci/slurm.sh stop)
ClusterName=mpipub-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups (none usable in a container): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
# pip's MPICH wants PMI-2 (it has no PMIx); plain srun gets it.
MpiDefault=pmi2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Start jobs at once; forget finished ones after a few seconds; refuse impossible ones.
SchedulerParameters=batch_sched_delay=0
MinJobAge=10
EnforcePartLimits=ALL
ReturnToService=2
# Between SIGTERM (scancel, time limit) and SIGKILL.
KillWait=10
SlurmdParameters=config_overrides
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
}

# pid_of NAME PIDFILE: the PID in the file if that process is alive and is NAME, else nothing.
pid_of() {
  local pid
  [[ -s $2 ]] || return 0
  pid=$(<"$2")
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  if [[ -r /proc/$pid/comm && $(</proc/$pid/comm) == "$1" ]]; then echo "$pid"; fi
}

controller_up() { timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; }

node_ready() {
  local state
  state=$(timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
  # ("idle*": the controller has not heard from slurmd)
  [[ $state == idle || $state == mixed || $state == allocated ]]
}

start() {
  command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' first"
  write_config
  mkdir -p /run/munge
  chown munge:munge /run/munge
  chmod 0755 /run/munge
  if [[ -z $(pid_of munged /run/munge/munged.pid) ]]; then
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  fi
  # Wait (bounded) for munged's socket.
  local t=0
  until munge -n </dev/null >/dev/null 2>&1; do
    ((t++ < 50)) || die "munged did not start (see /var/log/munge/munged.log)"
    sleep 0.1
  done
  if [[ -z $(pid_of slurmctld "$DIR/slurmctld.pid") ]]; then
    # A fresh cluster every start: no jobs or node states from an earlier run (so the node
    # reads idle only once this slurmd has registered), job ids from 1, an empty job log.
    rm -rf "$DIR/state" "$DIR/jobcomp.txt"
    mkdir -p "$DIR/state"
    slurmctld -c
  fi
  if [[ -z $(pid_of slurmd "$DIR/slurmd.pid") ]]; then
    slurmd
  fi
  local deadline=$((SECONDS + START_TIMEOUT_S))
  until controller_up && node_ready; do
    if ((SECONDS > deadline)); then
      tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
      die "SLURM did not become ready within ${START_TIMEOUT_S} s (logs above, in $DIR)"
    fi
    sleep 0.5
  done
  # A node left DOWN/DRAIN by an earlier run comes back.
  scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
  say "running: node $NODE with $CPUS CPUs, partition debug; config $CONF; logs in $DIR"
}

# stop_daemon NAME PIDFILE: SIGTERM the PID in the file, wait (bounded), then SIGKILL it.
stop_daemon() {
  local pid t=0
  pid=$(pid_of "$1" "$2")
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    if ((t++ > 100)); then
      say "$1 (pid $pid) did not stop in 10 s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  rm -f "$2"
}

stop() {
  if controller_up; then
    # Every job of this (single-partition, local) cluster: SIGTERM, SIGKILL KillWait later.
    scancel --partition=debug >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 20))
    while squeue -h -t PD,R,CG,S -o %i 2>/dev/null | grep -q . && ((SECONDS < deadline)); do
      sleep 0.5
    done
  fi
  stop_daemon slurmd "$DIR/slurmd.pid"
  stop_daemon slurmctld "$DIR/slurmctld.pid"
  stop_daemon munged /run/munge/munged.pid
  if [[ -e $CONF ]] && grep -qF "$MARK" "$CONF"; then rm -f "$CONF"; fi
  say "stopped"
}

status() {
  [[ -e $CONF ]] || { say "not configured ($CONF missing)"; return 1; }
  controller_up || { say "controller not answering"; return 1; }
  node_ready || { say "node $NODE not ready"; return 1; }
  say "running"
}

case ${1:-} in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
