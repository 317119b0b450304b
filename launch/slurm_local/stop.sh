#!/usr/bin/env bash
# Stop the test Slurm started by start.sh (by PID).
STATE=${FLOWSCALE_SLURM_DIR:-/tmp/flowscale-slurm}
for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
  [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
done
pkill -x munged 2>/dev/null || true
exit 0
