#!/usr/bin/env bash
# Install, configure and start a single-node Slurm on this machine, for tests.
# Root, no systemd; slurmctld, slurmd and munged all on 127.0.0.1. Stop it with stop.sh.
#
#   bash launch/slurm_local/start.sh          # prints the state directory; add its bin/ to PATH
#
# slurm.conf is written BEFORE any Slurm package or command runs: without a config, Slurm
# commands look the controller up in DNS, and no traffic may leave loopback here.
set -euo pipefail

STATE=${FLOWSCALE_SLURM_DIR:-/tmp/flowscale-slurm}
CPUS=$(nproc)
mkdir -p "$STATE"/{spool,state,log,bin} /etc/slurm /run/munge /var/log/munge /var/lib/munge /etc/munge

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=flowscale
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobRequeue=1
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=5
MinJobAge=300
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF

need=()
for p in slurmctld slurmd slurm-client munge; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >"$STATE/log/apt.log" 2>&1 || {
    apt-get update -q >>"$STATE/log/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${need[@]}" >>"$STATE/log/apt.log" 2>&1
  }
fi

# Without slurmdbd plain `sacct` fails, and submitit then never sees a job end; this wrapper
# answers from the job-completion file instead. Put $STATE/bin first on PATH.
cat > "$STATE/bin/sacct" <<'WRAP'
#!/bin/sh
exec /usr/bin/sacct --completion "$@"
WRAP
chmod +x "$STATE/bin/sacct"

# munge: a key, then the daemon.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
fi

pkill -x slurmctld 2>/dev/null || true
pkill -x slurmd 2>/dev/null || true
sleep 0.5
/usr/sbin/slurmctld -c -i   # -c: start with a clean state (job ids restart at 1)
/usr/sbin/slurmd -N localhost

for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "^idle"; then
    echo "$STATE"
    exit 0
  fi
  sleep 0.5
done
echo "Slurm did not come up; see $STATE/log/" >&2
sinfo >&2 || true
exit 1
