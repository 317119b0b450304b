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
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"
CPUS=$(nproc)
mkdir -p "$STATE"/{spool,state,log,bin} /etc/slurm

{
  cat <<CONF
ClusterName=flowscale
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmdSpoolDir=$STATE/spool
SlurmdPidFile=$STATE/slurmd.pid
SlurmdLogFile=$STATE/log/slurmd.log
CONF
  slurm_common_conf "$STATE"
  echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN"
  echo "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
} > /etc/slurm/slurm.conf

need=()
for p in slurmctld slurmd slurm-client munge; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >"$STATE/log/apt.log" 2>&1 || {
    apt-get update -q >>"$STATE/log/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${need[@]}" >>"$STATE/log/apt.log" 2>&1
  }
fi

# sacct that works without slurmdbd (see common.sh). Put $STATE/bin first on PATH.
cat > "$STATE/bin/sacct" <<WRAP
#!/bin/sh
exec $SACCT "\$@"
WRAP
chmod +x "$STATE/bin/sacct"

start_munge

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
