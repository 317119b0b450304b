#!/usr/bin/env bash
# Stop the two-node test Slurm of start_two_nodes.sh and remove what it built: the daemons (by
# PID file), anything else still running inside its namespaces (job steps, tasks), the three
# namespaces (their veth pairs and the bridge go with them) and their /etc/netns files.
# Leaves the single-node cluster of start.sh alone. Safe to run when nothing is up.
# The state directory stays, for its logs.
STATE=${FLOWSCALE_SLURM2_DIR:-/tmp/flowscale-slurm2}
NSS=(fs2-node1 fs2-node2 fs2-ctl)

alive() {  # PID NAME: is PID a running NAME (not a recycled id)?
  [ -n "$1" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  name=$(basename "$f" .pid); name=${name%%-*}
  alive "$pid" "$name" && kill "$pid" 2>/dev/null
  rm -f "$f"
done

# Whatever is left in the namespaces (slurmstepd, which ignores SIGTERM, job scripts, training
# processes): TERM, then KILL after 3 s. `ip netns pids` lists exactly the processes inside.
in_namespaces() {
  for ns in "${NSS[@]}"; do ip netns pids "$ns" 2>/dev/null; done
}
pids=$(in_namespaces)
# shellcheck disable=SC2086
[ -n "$pids" ] && kill $pids 2>/dev/null
for i in $(seq 1 30); do
  pids=$(in_namespaces)
  [ -z "$pids" ] && break
  # shellcheck disable=SC2086
  [ "$i" -gt 6 ] && kill -9 $pids 2>/dev/null
  sleep 0.5
done

for ns in "${NSS[@]}"; do
  ip netns del "$ns" 2>/dev/null
  rm -rf "/etc/netns/$ns"
done

# munged is shared: stop it only if start_two_nodes.sh started it and the single-node cluster
# is not running on it.
if [ -s "$STATE/munged.ours" ]; then
  pid=$(cat "$STATE/munged.ours")
  single=$(cat "${FLOWSCALE_SLURM_DIR:-/tmp/flowscale-slurm}/slurmctld.pid" 2>/dev/null)
  if alive "$pid" munged && ! alive "$single" slurmctld; then
    kill "$pid" 2>/dev/null
  fi
  rm -f "$STATE/munged.ours"
fi
exit 0
