"""`flowscale submit` across two Slurm nodes on this one machine: slurmctld and two slurmd, each in
its own network namespace joined by a bridge (launch/slurm_local/start_two_nodes.sh), and a
2-node x 1-task DeepSpeed ZeRO-2 job whose ranks meet over that network. The cluster is started
and torn down here; skipped with the reason where namespaces or Slurm are not available."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flowscale.config import load_config
from flowscale.flows.models import build_flow
from flowscale.logging import read_metrics
from launch.submit import submit

from helpers import SMALL_RUN as SMALL, wait_for

SCRIPTS = Path(__file__).resolve().parents[1] / "launch" / "slurm_local"
STATE = Path(os.environ.get("FLOWSCALE_SLURM2_DIR", "/tmp/flowscale-slurm2"))
NODE_IP = {"node1": "10.213.8.11", "node2": "10.213.8.12"}  # as in start_two_nodes.sh


@pytest.fixture(scope="module")
def two_node_cluster():
    """The running two-node cluster (its state directory), with its client wrappers first on PATH."""
    if os.geteuid() != 0:
        pytest.skip("the two-node Slurm needs root (network namespaces, slurmd)")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed; apt-get install iproute2")
    if not Path("/usr/sbin/slurmd").exists():
        pytest.skip("no slurmd here; apt-get install slurmctld slurmd slurm-client munge")
    try:
        r = subprocess.run(["bash", str(SCRIPTS / "start_two_nodes.sh")], capture_output=True, text=True,
                           timeout=180)
        if r.returncode == 2:  # this machine cannot host it (the script says why)
            pytest.skip(r.stderr.strip())
        assert r.returncode == 0, f"start_two_nodes.sh failed:\n{r.stderr[-3000:]}"
        with pytest.MonkeyPatch.context() as mp:
            # submitit calls sbatch/sacct/scancel from PATH: the wrappers reach this cluster's
            # controller, and SLURM_CONF (exported to the job by sbatch) keeps srun on it too.
            mp.setenv("PATH", f"{STATE / 'bin'}:{os.environ['PATH']}")
            mp.setenv("SLURM_CONF", str(STATE / "slurm.conf"))
            yield STATE
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop_two_nodes.sh")], capture_output=True, timeout=120)


def link_bytes(ns: str) -> tuple[int, int]:
    """(received, sent) bytes on the node's only link, fs0, inside network namespace ``ns``."""
    out = subprocess.run(["ip", "-n", ns, "-j", "-s", "link", "show", "fs0"], capture_output=True, text=True,
                         check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def test_two_nodes_zero2_train_and_agree(tmp_path, two_node_cluster, monkeypatch):
    # Exported to both tasks by sbatch. The compute link is called fs0 in every node namespace,
    # so one interface name pins gloo to it on both ranks.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "fs0")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_dir = tmp_path / "run"
    overrides = SMALL + ["train.steps=4", "engine.zero_stage=2", "data.streams=4", f"train.run_dir={run_dir}"]
    before = link_bytes("fs2-node2")
    # max_timeouts=0: a job that hangs fails at its time limit instead of being requeued.
    (job,) = submit(None, overrides, nodes=2, tasks_per_node=1, time_min=4, max_timeouts=0)
    try:
        wait_for(job.done, 300, "the two-node job's results")
        results = job.results()
        # Results come back while the tasks are still exiting; Slurm has the last word.
        wait_for(lambda: job.get_info().get("State") == "COMPLETED", 60, "Slurm to record the job as completed")
    finally:
        subprocess.run(["scancel", str(job.job_id)], check=False)
    after = link_bytes("fs2-node2")

    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["step"] == 4 for r in results)
    assert {r["step"]: r["health/ranks_agree"] for r in read_metrics(run_dir) if "health/ranks_agree" in r} == {4: 1}

    # One task on each node: Slurm's record, and each task's own view (its hostname is its node's).
    assert job.get_info()["NodeList"] == "node[1-2]"
    for rank, node in enumerate(NODE_IP):
        log = Path(job.task(rank).paths.stdout).read_text()
        env_line = re.search(r"Starting with JobEnvironment\((.*)\)", log).group(1)
        assert f"hostname={node}," in env_line and f"global_rank={rank}(2)" in env_line, env_line

    # The rendezvous: MASTER_ADDR is the job's first host, node1, which rank 1 on node2 can only
    # reach at node1's namespace address, through node2's one link. ZeRO-2 moves at least half
    # the fp32 gradients out of node2 and half the parameters into it every step; Slurm's own
    # messages for the job are a few kB.
    lookup = subprocess.run(["ip", "netns", "exec", "fs2-node2", "getent", "hosts", "node1"],
                            capture_output=True, text=True).stdout.split()
    assert lookup[:1] == [NODE_IP["node1"]]
    cfg = load_config(None, overrides)
    n_params = sum(p.numel() for p in build_flow(cfg.model, cfg.data.channels, cfg.data.image_size).parameters())
    floor = 4 * n_params * 4 // 2
    received, sent = after[0] - before[0], after[1] - before[1]
    assert received >= floor and sent >= floor, (received, sent, floor)

    # The same run resubmitted on one node: it resumes with its ZeRO-2 state resharded and says so;
    # a change the checkpoint cannot honour is refused by submit itself, before anything is queued.
    from flowscale.config import ConfigError
    from launch.submit import check_resume

    jobs_before = sorted(p.name for p in (run_dir / "submitit").iterdir())
    with pytest.raises(ConfigError, match="data.batch_size"):
        submit(None, [*overrides, "data.batch_size=32"], nodes=1, tasks_per_node=1, time_min=4, max_timeouts=0)
    assert sorted(p.name for p in (run_dir / "submitit").iterdir()) == jobs_before, "nothing was submitted"
    more = [*overrides, "train.steps=8"]
    assert check_resume(load_config(None, more), 1) == ["ranks 2 -> 1", "train.steps 4 -> 8"]
    (job,) = submit(None, more, nodes=1, tasks_per_node=1, time_min=4, max_timeouts=0)
    try:
        wait_for(job.done, 300, "the one-node job's results")
        (result,) = job.results()
    finally:
        subprocess.run(["scancel", str(job.job_id)], check=False)
    log = Path(job.paths.stdout).read_text()
    assert "resuming step_00000004 written by 2 rank(s) (ZeRO-2) on 1 (ZeRO-2): optimizer state resharded (universal checkpoint)" in log
    assert result["step"] == 8
    assert sorted(r["step"] for r in read_metrics(run_dir) if "train/bpd" in r) == list(range(1, 9)), "every step once"

