# Shared by start.sh (one node on 127.0.0.1) and start_two_nodes.sh (two nodes in network
# namespaces): the slurm.conf settings both test clusters run with, and munge. Sourced, not run.

# slurm.conf lines common to both clusters, for state directory STATE. Each caller adds its own
# names, addresses, ports, slurmd paths, nodes and partition.
#   JobRequeue=1              preempted / timed-out jobs may requeue (submitit relies on it)
#   sched_interval/bf_interval=2, KillWait=5   schedule and kill within seconds, not minutes
#   MinJobAge=300             finished jobs stay visible to squeue/scontrol for 5 minutes
#   proctrack/linuxproc, task/none   no cgroups needed (containers, no systemd)
#   jobcomp/filetxt           no slurmdbd: job ends go to $STATE/jobcomp.txt, which the
#                             `sacct --completion` wrappers read (SACCT below)
slurm_common_conf() {  # STATE
  cat <<CONF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CryptoType=crypto/munge
StateSaveLocation=$1/state
SlurmctldPidFile=$1/slurmctld.pid
SlurmctldLogFile=$1/log/slurmctld.log
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
JobCompLoc=$1/jobcomp.txt
CONF
}

# Without slurmdbd plain `sacct` fails, and submitit then never sees a job end; --completion
# answers from the job-completion file instead. Both clusters' sacct wrappers run this.
SACCT="/usr/bin/sacct --completion"

# munge, shared by both clusters (its socket is a path, seen from every namespace): a key, then
# the daemon unless one runs. Sets MUNGE_STARTED=1 when this call started it.
start_munge() {
  MUNGE_STARTED=0
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c "/usr/sbin/munged" 2>/dev/null || /usr/sbin/munged --force
    sleep 0.2  # its pid file appears once it has daemonised
    MUNGE_STARTED=1
  fi
}
