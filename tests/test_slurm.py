"""`flowscale submit` against a real Slurm (slurmctld + slurmd + munge on 127.0.0.1), started
by launch/slurm_local/start.sh (.ci/run does that). Skipped with the reason when no cluster answers."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from flowscale.checkpoint import list_complete
from flowscale.cli import main as cli_main
from flowscale.logging import read_metrics
from launch.submit import submit

from helpers import SMALL_RUN as SMALL, final_weights, wait_for

STATE = Path(os.environ.get("FLOWSCALE_SLURM_DIR", "/tmp/flowscale-slurm"))


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    if shutil.which("sinfo") is None:
        pytest.skip("no Slurm here: run `bash launch/slurm_local/start.sh` (root, Debian) to start a test cluster")
    os.environ["PATH"] = f"{STATE / 'bin'}:{os.environ['PATH']}"  # the sacct wrapper (no slurmdbd)
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        out = ""
    if "idle" not in out and "mix" not in out and "alloc" not in out:
        pytest.skip("Slurm does not answer (no idle node): run `bash launch/slurm_local/start.sh`")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield


def test_two_tasks_train_and_agree(tmp_path):
    run_dir = tmp_path / "run"
    (job,) = submit(None, SMALL + ["train.steps=6", f"train.run_dir={run_dir}"], tasks_per_node=2, time_min=5)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["step"] == 6 for r in results)
    assert {r["step"]: r["ranks_agree"] for r in read_metrics(run_dir) if "ranks_agree" in r} == {6: 1}
    assert (run_dir / "submitit").is_dir()
    # Slurm's --cpus-per-task 1 (submitit's default), not every core of the node per task
    assert "threads per process: 1 (" in Path(job.paths.stdout).read_text()


@pytest.mark.parametrize("array", [False, True])
def test_dry_run_is_the_script_sbatch_gets(tmp_path, capsys, array):
    """The CLI's --dry-run, then the same submit for real: submitit hands sbatch that very script,
    and Slurm holds the job with the CPUs per task derived from data.num_workers and the
    --slurm options (--hold keeps it from running; it is cancelled unrun)."""
    args = ["submit", "demo", f"train.run_dir={tmp_path / 'run'}", "data.num_workers=1", "--slurm", "requeue",
            "--slurm", "hold", "--time", "5"]
    if array:
        (tmp_path / "sweep.yaml").write_text("- {optim.lr: 0.001}\n- {optim.lr: 0.0005}\n")
        args += ["--array", str(tmp_path / "sweep.yaml")]
    assert cli_main([*args, "--dry-run"]) == 0
    script = capsys.readouterr().out
    assert ("#SBATCH --array=0-1%2\n" in script) == array
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    ids = re.findall(r"submitted job (\S+) to Slurm", out)
    assert len(ids) == (2 if array else 1) and "cpus per task: 2 (1 loader worker(s)" in err, (out, err)
    job_id = ids[0].split("_")[0]
    try:
        assert (tmp_path / "run" / "submitit" / f"{job_id}_submission.sh").read_text() == script
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
        assert "CPUs/Task=2" in shown and "Requeue=1" in shown and "Reason=JobHeldUser" in shown, shown
    finally:
        subprocess.run(["scancel", job_id], check=False)


def test_crash_is_reported_not_hung(tmp_path):
    # 15 images do not split over 2 ranks: the job fails inside, and the submitter must hear why.
    run_dir = tmp_path / "run"
    (job,) = submit(None, SMALL + ["train.steps=2", "data.batch_size=15", f"train.run_dir={run_dir}"],
                    tasks_per_node=2, time_min=5)
    t0 = time.time()
    with pytest.raises(Exception, match="divisible"):
        job.results()
    assert time.time() - t0 < 240


def test_preemption_requeues_and_resumes_exactly(tmp_path):
    common = SMALL + ["train.steps=240", "train.checkpoint_every=20"]
    ref_dir, pre_dir = tmp_path / "reference", tmp_path / "preempted"
    (ref,) = submit(None, common + [f"train.run_dir={ref_dir}"], tasks_per_node=2, time_min=10)
    (job,) = submit(None, common + [f"train.run_dir={pre_dir}"], tasks_per_node=2, time_min=10)
    wait_for(lambda: len(list_complete(pre_dir)) >= 1, 300, "a first checkpoint", job)
    done_before = [p.name for p in list_complete(pre_dir)]
    assert "step_00000240" not in done_before, "the run finished before it could be preempted"
    job._interrupt()  # SIGTERM + USR2, as a preemption
    results = job.results()
    assert all(r["step"] == 240 for r in results)
    logs = Path(job.paths.stdout).read_text()
    saved = re.findall(r"preempted: saved step (\d+) in ", logs)
    resumed = re.findall(r"resumed from \S+ at step (\d+)", logs)
    assert len(saved) == 1 and resumed == saved, f"the requeued job resumes at the step it reached: {saved} {resumed}"
    assert int(saved[0]) >= int(done_before[-1].split("_")[1]), "saved on the signal, at the step reached"
    steps = sorted(r["step"] for r in read_metrics(pre_dir) if "bpd" in r)
    assert steps == list(range(1, 241)) and not (pre_dir / "metrics.superseded.jsonl").exists(), "no step lost"
    ref.results()
    a, b = final_weights(ref_dir), final_weights(pre_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _newest_step(run_dir: Path) -> int:
    return max((int(p.name.split("_")[1]) for p in list_complete(run_dir)), default=0)


def _job_log(job) -> str:
    """What the job's task wrote to stdout so far, every slot (a requeued job appends to the same file)."""
    return Path(job.paths.stdout).read_text() if Path(job.paths.stdout).is_file() else ""


def _saved_steps(job) -> list[int]:
    return [int(s) for s in re.findall(r"preempted: saved step (\d+) in ", _job_log(job))]


@pytest.mark.slow
def test_time_limit_requeues_until_the_budget_is_spent(tmp_path):
    """The time-limit path, at known points instead of by the clock. Ahead of the limit Slurm
    sends USR2 alone (``--signal``; a preemption sends SIGTERM first), and submitit counts it as a
    time-out once the job has run past its guaranteed time, min(80 % of the limit, the limit
    - 10 min): always, within a 10-minute limit. The test sends that USR2 to the job's tasks,
    as Slurm does (``scancel --signal=USR2``), each time once the current slot has written a
    checkpoint, so its handlers are in place whatever the machine's speed. (Slurm may send its
    signal up to 60 s early, so with a short limit it can come before Python is up, and the
    job dies of it: that timing is Slurm's, and no part of what is tested here.)

    Each time-out must save the step reached and requeue the job under the same id with one
    time-out fewer (--max-timeouts 2); each requeued job resumes at that step; the third
    time-out ends the job, the budget spent, with every step up to its save in the metrics."""
    max_timeouts = 2
    run_dir = tmp_path / "run"
    (job,) = submit(None, SMALL + ["train.steps=100000", "train.checkpoint_every=10", f"train.run_dir={run_dir}"],
                    tasks_per_node=1, time_min=10, signal_delay_s=30, max_timeouts=max_timeouts)
    try:
        script = Path(job.paths.submission_file).read_text()
        assert "#SBATCH --signal=USR2@30" in script and "#SBATCH --time=10" in script, script
        saved = 0
        for k in range(max_timeouts + 1):
            wait_for(lambda: _newest_step(run_dir) > saved, 300, f"a checkpoint after step {saved}", job)
            subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
            if k < max_timeouts:
                wait_for(lambda: len(_saved_steps(job)) > k, 300, f"the save on time-out {k + 1}", job)
                saved = _saved_steps(job)[-1]
        with pytest.raises(Exception, match="timed-out too many times"):
            job.results()
    finally:
        subprocess.run(["scancel", str(job.job_id)], check=False)
    log = _job_log(job)
    saved = _saved_steps(job)
    assert len(saved) == max_timeouts + 1 and saved == sorted(set(saved)), saved
    assert log.count("this job is timed-out") == max_timeouts + 1, "every USR2 was a time-out (none a preemption)"
    remaining = re.findall(rf"Requeued job {job.job_id} \((\d+) remaining timeouts\)", log)
    assert remaining == [str(n) for n in range(max_timeouts - 1, -1, -1)], remaining
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log)]
    assert resumed == saved[:-1], f"each requeued job resumes at the step saved on the time-out: {resumed} {saved}"
    assert _newest_step(run_dir) == saved[-1]
    steps = sorted(r["step"] for r in read_metrics(run_dir) if "bpd" in r)
    assert steps == list(range(1, saved[-1] + 1)) and not (run_dir / "metrics.superseded.jsonl").exists(), \
        "no step lost or repeated"
    assert sorted(p.name for p in (run_dir / "submitit").glob("*_log.out")) == [f"{job.job_id}_0_log.out"]
