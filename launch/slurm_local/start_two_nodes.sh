#!/usr/bin/env bash
# Start a two-node Slurm on this one machine, for multi-node tests. Stop it with stop_two_nodes.sh.
#
#   bash launch/slurm_local/start_two_nodes.sh    # prints the state directory; put its bin/ first on PATH
#
# Three network namespaces joined by a Linux bridge, none of them touching the machine's own
# network (nothing is added to the root namespace, no traffic leaves these namespaces):
#
#   fs2-ctl    bridge br0  10.213.8.1   "ctl"    slurmctld
#   fs2-node1  veth fs0    10.213.8.11  "node1"  slurmd -N node1
#   fs2-node2  veth fs0    10.213.8.12  "node2"  slurmd -N node2
#
# Each daemon also gets its own hostname (a UTS namespace), so a task's gethostname() says which
# node it runs on. The compute interface is called fs0 in both node namespaces (interface names
# are per namespace), so one GLOO_SOCKET_IFNAME=fs0 in the job's environment serves every rank.
# Names resolve from per-namespace hosts files (`ip netns exec NS` bind-mounts /etc/netns/NS/hosts
# over /etc/hosts) and an empty resolv.conf, never from DNS; the global /etc/hosts is untouched.
#
# Independent of the single-node cluster of start.sh, which may run at the same time: its own
# slurm.conf (SLURM_CONF, passed to every daemon and client), ports 6827/6828 instead of
# 6817/6818, state in /tmp/flowscale-slurm2, job ids from 200001 (so a process that talks to both
# clusters never mixes up their jobs). munged is shared: its socket is a path, seen from every
# namespace. Caveat: start.sh kills slurmctld/slurmd by name and stop.sh kills munged, so running
# those while this cluster is up takes it down.
#
# Client commands (sbatch, squeue, scancel, sacct, ...) are wrappers in $STATE/bin that set
# SLURM_CONF and run the real command inside fs2-ctl; from inside a node (in a job) they run it
# in place. Starting again restarts the cluster from a clean state.
#
# Exit status: 0 up; 2 this machine cannot host it (not root, no iproute2/unshare/Slurm, network
# namespaces refused), with the reason on stderr; 1 Slurm did not come up (see $STATE/log/).
set -euo pipefail

STATE=${FLOWSCALE_SLURM2_DIR:-/tmp/flowscale-slurm2}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"
CONF=$STATE/slurm.conf
CTL_NS=fs2-ctl
NODES=(node1 node2)
SUBNET=10.213.8
CTL_IP=$SUBNET.1
declare -A NODE_IP=([node1]=$SUBNET.11 [node2]=$SUBNET.12)
CTL_PORT=6827
SLURMD_PORT=6828
CPUS=$(nproc)

cannot() { echo "two-node Slurm cannot run here: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || cannot "needs root (network namespaces, slurmd)"
for tool in ip unshare; do command -v "$tool" >/dev/null || cannot "'$tool' is not installed"; done
for bin in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/sbin/munged /usr/bin/sbatch /usr/bin/sinfo; do
  [ -x "$bin" ] || cannot "$bin is missing (apt-get install slurmctld slurmd slurm-client munge)"
done

# A clean start: whatever an earlier run left (daemons, namespaces) goes first.
bash "$HERE/stop_two_nodes.sh" >/dev/null 2>&1 || true
rm -rf "$STATE/spool" "$STATE/state" "$STATE/log" "$STATE/jobcomp.txt"
mkdir -p "$STATE"/{state,log,bin} "${NODES[@]/#/$STATE/spool/}"

# slurm.conf first: without it any Slurm command looks the controller up in DNS.
# %n in the slurmd paths is the node name, so the two slurmds keep apart.
{
  cat <<CONF
ClusterName=flowscale2
SlurmctldHost=ctl($CTL_IP)
SlurmctldPort=$CTL_PORT
SlurmdPort=$SLURMD_PORT
SlurmdSpoolDir=$STATE/spool/%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
FirstJobId=200001
CONF
  slurm_common_conf "$STATE"
  for n in "${NODES[@]}"; do
    echo "NodeName=$n NodeAddr=${NODE_IP[$n]} CPUs=$CPUS State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
} > "$CONF"

# Hosts files, one per namespace: every name any daemon or task may look up. The machine's own
# hostname maps to the namespace's address in case something resolves gethostname() before the
# per-daemon hostname is set. An empty resolv.conf: glibc then tries only 127.0.0.1 inside the
# namespace, where nothing answers, so an unknown name fails at once and no query leaves.
write_netns_files() {  # NS OWN_IP
  mkdir -p "/etc/netns/$1"
  {
    echo "127.0.0.1 localhost"
    echo "$CTL_IP ctl"
    for n in "${NODES[@]}"; do echo "${NODE_IP[$n]} $n"; done
    echo "$2 $(hostname)"
  } > "/etc/netns/$1/hosts"
  : > "/etc/netns/$1/resolv.conf"
}

# The network: a bridge inside fs2-ctl, and for each node a veth pair with its fs0 end in the
# node's namespace and the other end on the bridge. Created directly inside the namespaces.
err=$(ip netns add "$CTL_NS" 2>&1) || cannot "network namespaces are not permitted: $err"
ip -n "$CTL_NS" link set lo up
ip -n "$CTL_NS" link add br0 type bridge
ip -n "$CTL_NS" addr add "$CTL_IP/24" dev br0
ip -n "$CTL_NS" link set br0 up
write_netns_files "$CTL_NS" "$CTL_IP"
for n in "${NODES[@]}"; do
  ns=fs2-$n
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add fs0 netns "$ns" type veth peer name "$n" netns "$CTL_NS"
  ip -n "$CTL_NS" link set "$n" master br0
  ip -n "$CTL_NS" link set "$n" up
  ip -n "$ns" addr add "${NODE_IP[$n]}/24" dev fs0
  ip -n "$ns" link set fs0 up
  write_netns_files "$ns" "${NODE_IP[$n]}"
done

# Client wrappers: SLURM_CONF set, and the real command run inside fs2-ctl unless the caller is
# already in one of this cluster's namespaces (a batch script calling srun on node1).
for cmd in sbatch srun salloc squeue scancel scontrol sinfo sacct; do
  real=/usr/bin/$cmd
  [ "$cmd" = sacct ] && real=$SACCT  # works without slurmdbd (see common.sh)
  cat > "$STATE/bin/$cmd" <<WRAP
#!/bin/sh
# $cmd for the two-node test cluster (written by start_two_nodes.sh)
export SLURM_CONF=$CONF
case "\$(ip netns identify \$\$ 2>/dev/null)" in
  fs2-*) exec $real "\$@" ;;
  *) exec ip netns exec $CTL_NS $real "\$@" ;;
esac
WRAP
  chmod +x "$STATE/bin/$cmd"
done

# munge: shared with the single-node cluster; started only if it is not running (and then
# remembered, so stop_two_nodes.sh may stop it again).
start_munge
if [ "$MUNGE_STARTED" = 1 ]; then
  cp /run/munge/munged.pid "$STATE/munged.ours" 2>/dev/null || true
fi

# The daemons, each in its namespace under its own hostname. slurmctld must run on a host named
# in SlurmctldHost; -c starts from a clean state (job ids restart at FirstJobId).
# `ip netns exec` mounts a fresh /sys, without the cgroup tree, and slurmd 22.05 loads its cgroup
# plugin even though nothing here uses cgroups: it only needs a cgroup v1 root with a
# name=systemd hierarchy, so an empty tmpfs holding that one hierarchy stands in, mounted in the
# daemon's private mount namespace (gone with it; the machine's mounts are untouched).
in_ns() {  # NS HOSTNAME CMD...: run CMD in network namespace NS with hostname HOSTNAME
  local ns=$1 host=$2; shift 2
  SLURM_CONF=$CONF ip netns exec "$ns" unshare --uts sh -c '
    mount -t tmpfs cgroup_root /sys/fs/cgroup &&
    mkdir /sys/fs/cgroup/systemd &&
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd &&
    hostname "$0" && exec "$@"' "$host" "$@" || { echo "could not start $* in $ns" >&2; exit 1; }
}
in_ns "$CTL_NS" ctl /usr/sbin/slurmctld -c -i -f "$CONF"
for n in "${NODES[@]}"; do
  in_ns "fs2-$n" "$n" /usr/sbin/slurmd -N "$n" -f "$CONF"
done

for _ in $(seq 1 120); do
  idle=$("$STATE/bin/sinfo" -h -N -o "%N %T" 2>/dev/null | grep -c " idle$" || true)
  if [ "$idle" = "${#NODES[@]}" ]; then
    echo "$STATE"
    exit 0
  fi
  sleep 0.5
done
echo "two-node Slurm did not come up; see $STATE/log/" >&2
"$STATE/bin/sinfo" -N >&2 || true
tail -n 20 "$STATE"/log/*.log >&2 || true
exit 1
