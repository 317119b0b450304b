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
from flowscale.config import load_config
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


def steps_per_second(tmp_path, overrides) -> float:
    """This machine's training speed for ``overrides`` right now (in-process, same model)."""
    from flowscale.train import main

    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    try:
        main(load_config(None, overrides + ["train.steps=20", f"train.run_dir={tmp_path / 'warm'}"]))
        t0 = time.time()
        main(load_config(None, overrides + ["train.steps=220", f"train.run_dir={tmp_path / 'warm'}"]))
        return 200 / (time.time() - t0)
    finally:  # the rendezvous variables main() filled in must not travel into the sbatch environment
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # up to max_timeouts slots of ~30 s
def test_time_limit_requeues_until_done(tmp_path):
    # A 1-minute limit with USR2 30 s before it (~20 s of training per slot after start-up) and
    # ~35 s of training, sized from this machine's measured speed: the job must hit its time
    # limit, be requeued under the same id, resume from its newest checkpoint, and finish; the
    # time-out budget counts down from --max-timeouts (not submitit's default of 3).
    # Slurm sends --signal "up to 60 seconds earlier than specified" (sbatch(1)), so a slot can
    # end a few seconds after it starts, before Python is even up on a loaded machine: the
    # budget is generous, and a run that needs all of it is stuck, not slow.
    import pickle

    max_timeouts = 30

    common = SMALL + ["train.checkpoint_every=25"]
    # No large floor: on a loaded machine 400 steps took 30 slots of a few seconds each.
    steps = max(100, int(35 * steps_per_second(tmp_path, common)) // 25 * 25)
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        (job,) = submit(None, common + [f"train.steps={steps}", f"train.run_dir={run_dir}"],
                        tasks_per_node=1, time_min=1, signal_delay_s=30,
                        max_timeouts=max_timeouts)
        try:
            results = job.results()
        finally:
            subprocess.run(["scancel", str(job.job_id)], check=False)
        assert results[0]["step"] == steps
        log = Path(job.paths.stdout).read_text()
        resumes = log.count("resumed from")
        if resumes:
            break
        # The machine got faster than measured and the whole run fit in one slot: that tests
        # nothing, so again with three times the steps (speed is not this test's business).
        steps *= 3
    assert resumes >= 1, f"{steps // 3} steps fit in one 30 s slot three times"
    # Requeues as submitit logs them: on a loaded machine a slot can end before its first
    # checkpoint, and the next one then starts afresh, requeued but not "resumed from".
    requeues = log.count(f"Requeued job {job.job_id} ")
    assert requeues >= resumes
    countdown = pickle.loads(Path(job.paths.submitted_pickle).read_bytes())._timeout_countdown
    assert countdown == max_timeouts - requeues, "every requeue was a time-out, counted against --max-timeouts"
    assert sorted(p.name for p in (run_dir / "submitit").glob("*_log.out")) == [f"{job.job_id}_0_log.out"]
