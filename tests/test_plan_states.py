"""flowscale plan's model states (:func:`flowscale.tools.plan.model_state_bytes`) against a real
DeepSpeed engine on CPU (gloo), ZeRO-0..3, fp32 and bf16, Adam and Adamax, with and without EMA,
on one rank and on two.

Each case runs in a fresh process (forked, per rank, from one runner that imported torch and
DeepSpeed once: a second per case instead of ~8 s of imports) that builds the model and the
engine exactly as ``flowscale train`` does and takes two ``train_step`` calls on a random uint8
batch. The bytes held are the sum over every distinct live tensor storage that Python holds
(parameters, their ``.grad``, DeepSpeed's flat buffers, optimizer state, EMA), less what the
process held before the model was built; not a collective's temporaries that gloo's worker
thread has yet to let go of (see ``_held_by_python``). Three moments of the second step are
compared with the lifetimes model_state_bytes documents:

* during backward (when the first parameter's gradient arrives, near its end): the reduce
  bucket of ZeRO-1/2/3 is alive, exactly ``reduce_bucket_size`` elements in the training dtype;
* at the end of backward (entering ``engine.step``): the persistent states plus the reduced
  gradient partition of ZeRO-1/2 (plus ``param.grad`` at ZeRO-0, which the plan counts with the
  activations);
* after the step: only the persistent states (ZeRO-1/2 freed their bucket and gradients).

After the step the census is exact to a few hundred bytes (whole multiples of P bytes plus
bookkeeping); at the end of backward to 1% (a rank's gradient partition rounds to whole
parameters). The tolerance is 2%: a formula missing any part (the fp32 master weights are 20-25%
of the ZeRO-1/2 states) fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
# demo.yaml at width 256: 1.98M parameters (states of 12-20 bytes each: 24-40 MB), micro-batch 2.
OVERRIDES = ["model.width=256", "optim.lr=1e-6", "wandb.mode=disabled"]
MICRO = 2
TOL = 0.02

# (precision, zero stage, optimizer, EMA, ranks)
CASES = [
    ("fp32", 0, "adam", False, 1),
    ("fp32", 0, "adamax", True, 1),
    ("bf16", 0, "adam", True, 1),
    ("fp32", 1, "adamax", False, 1),
    ("bf16", 1, "adam", True, 1),
    ("fp32", 2, "adam", True, 1),
    ("bf16", 2, "adamax", False, 1),
    ("fp32", 3, "adam", False, 1),
    ("bf16", 3, "adamax", False, 1),
    ("bf16", 0, "adam", False, 2),  # the fp32 master copy and moments of ZeRO-0 bf16 are not partitioned
    ("bf16", 1, "adam", False, 2),
    ("fp32", 2, "adam", False, 2),
    ("fp32", 3, "adam", False, 2),
]


def case_id(case) -> str:
    prec, z, opt, ema, n = case
    return f"{prec}-zero{z}-{opt}{'-ema' if ema else ''}-{n}rank"


# -- the measuring side (runs in the forked processes) ------------------------------------------

def _census(skip: dict, held_only: bool = True) -> tuple[int, int, dict]:
    """(bytes, largest storage's bytes, storages) of the distinct live tensor storages, other than
    those in ``skip``, that Python holds (see :func:`_held_by_python`); every one gc can reach
    without ``held_only``."""
    import gc

    import torch

    gc.collect()
    objs = gc.get_objects()
    held = _held_by_python(objs) if held_only else None
    found = {}

    def add(t):
        if t.device.type == "meta" or t.layout != torch.strided:
            return
        s = t.untyped_storage()
        if s._cdata not in skip and s._cdata not in found:
            found[s._cdata] = s

    for o in objs:
        if isinstance(o, torch.Tensor):
            if held is None or id(o) in held:
                add(o)
            if o.is_leaf and o.requires_grad and o.grad is not None:  # a grad never touched from Python has no wrapper
                add(o.grad)
    del objs, o
    sizes = [s.nbytes() for s in found.values()]
    return sum(sizes), max(sizes, default=0), found


def _held_by_python(objs: list) -> set[int]:
    """ids of the tensors in ``objs`` (gc's objects) that a Python object or frame refers to.

    The others are alive only because C++ keeps them, for as long as timing decides: gloo runs
    every collective on a worker thread, which lets go of a finished collective's tensors when
    it next runs, or later. DeepSpeed hands it temporaries that Python has dropped when the call
    returns: ZeRO-1/2 all-reduce the gradients through one flattened copy (wP bytes; on one
    rank, a view of the reduce bucket, which keeps all w 5e8 bytes of it). gc still lists their
    tensor objects, so a census counted them whenever the worker had not got to it yet: one
    such copy (2P bytes) failed bf16-zero1-adam-2rank's end of backward under load in CI. Model
    states are all held by Python objects (a parameter's ``.grad`` is reached through the
    parameter). A tensor only autograd holds would not be counted either; backward's census is
    used for its largest storage alone, the reduce bucket."""
    import gc
    import sys

    import torch

    held = {id(r) for r in gc.get_referents(*objs)}  # referred to by an object ...
    for frame in sys._current_frames().values():  # ... or by a frame (locals are no gc referents)
        while frame is not None:
            held.update(id(v) for v in frame.f_locals.values() if isinstance(v, torch.Tensor))
            frame = frame.f_back
    return held


def _measure(case) -> dict:
    import torch

    from flowscale.build import build_training
    from flowscale.config import load_config
    from flowscale.distributed import init_distributed
    from flowscale.engine import train_step
    from flowscale.loss import training_loss

    prec, z, opt, ema_on, n = case
    cfg = load_config(ROOT / "configs/demo.yaml", OVERRIDES + [
        f"engine.precision={prec}", f"engine.zero_stage={z}", f"optim.name={opt}",
        f"optim.ema_decay={0.999 if ema_on else 0}", f"data.batch_size={MICRO * n}"])
    info = init_distributed("gloo")
    c, s = cfg.data.channels, cfg.data.image_size
    batch = torch.randint(0, 256, (MICRO, c, s, s), dtype=torch.uint8)
    init = torch.randint(0, 256, (8, c, s, s), dtype=torch.uint8)  # this rank's images for ActNorm's init
    _, _, base = _census({}, held_only=False)  # kept referenced: a freed storage's address must not be reused and skipped
    skip = dict(base)

    # As flowscale.train._train does it.
    run = build_training(cfg, info, init, torch.device("cpu"))
    engine, ema = run.engine, run.ema
    loss_fn = training_loss(cfg, run.device, run.dtype)

    out = {"rank": info.rank, "params": run.n_params, "optimizer_class": type(engine.optimizer).__name__,
           "reduce_bucket_size": engine.zero_reduce_bucket_size()}  # as DeepSpeed read it
    measuring = [False]

    def in_backward(_p):  # the first parameter's gradient comes (about) last in backward
        if measuring[0] and "backward" not in out:
            out["backward"], out["backward_largest"], found = _census(skip)
            # ZeRO-1/2 with overlap_comm double-buffer the reduce bucket: count the buffers of its size
            out["bucket_buffers"] = sum(1 for st in found.values() if st.nbytes() == out["backward_largest"])

    first = next(p for p in engine.module.parameters() if p.requires_grad)
    first.register_post_accumulate_grad_hook(in_backward)
    step = engine.step

    def entering_step(*a, **k):
        if measuring[0] and "end_of_backward" not in out:
            out["end_of_backward"], out["end_of_backward_largest"], _ = _census(skip)
        return step(*a, **k)

    engine.step = entering_step
    skipped = 0
    for i in range(2):  # the second step: optimizer moments exist (they are made lazily in the first)
        measuring[0] = i == 1
        metrics = train_step(engine, (batch, None), loss_fn)
        skipped += metrics["skipped"]
        if ema is not None and not metrics["skipped"]:
            ema.update(run.module)
    out["skipped"] = skipped
    out["after_step"], out["after_step_largest"], _ = _census(skip)
    # ZeRO-3 keeps parameters of <= stage3_param_persistence_threshold elements whole on every rank.
    out["persistent_param_numel"] = sum(p.ds_numel for p in engine.module.parameters()
                                        if getattr(p, "ds_persist", False)) if z == 3 else 0
    return out


def _run_all(out_dir: Path, slots: int = 2, timeout: int = 120) -> None:
    """Measure every case, each rank in a fresh forked process, ``slots`` processes at a time;
    writes <out_dir>/<case>.<rank>.json."""
    import gc
    import importlib
    import time

    import flowscale.train  # noqa: F401  (imported once here; every fork starts with them)

    # What deepspeed.initialize and the first steps import lazily (torch.compile and inductor,
    # through the Muon optimizer module, alone take ~3 s per process).
    for name in ("deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
                 "deepspeed.runtime.superoffload.superoffload_stage3", "deepspeed.ops.op_builder.all_ops",
                 "deepspeed.module_inject.auto_ep_layer", "deepspeed.moe.ep_router", "deepspeed.comm.mori",
                 "deepspeed.ops.triton_ops"):
        try:
            importlib.import_module(name)
        except Exception:  # another DeepSpeed version: the fork imports what it needs itself
            pass
    gc.freeze()  # what exists now is no model state: out of every census (and collection) in the forks

    pending, running = list(CASES), {}
    while pending or running:
        while pending and slots - len(running) >= pending[0][-1]:
            case = pending.pop(0)
            port = free_port()
            for rank in range(case[-1]):
                pid = os.fork()
                if pid == 0:  # a fresh process for this rank of this case
                    code = 1
                    try:
                        import signal

                        signal.alarm(timeout)  # a hung rendezvous or collective must not hang the test
                        os.environ.update(RANK=str(rank), WORLD_SIZE=str(case[-1]), LOCAL_RANK=str(rank),
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                        res = _measure(case)
                        (out_dir / f"{case_id(case)}.{rank}.json").write_text(json.dumps(res))
                        code = 0
                    except BaseException:
                        import traceback

                        traceback.print_exc()
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                running[pid] = (case, time.time())
        pid, status = os.wait()
        case, t0 = running.pop(pid)
        print(f"{case_id(case)}: exit {os.waitstatus_to_exitcode(status)} after {time.time() - t0:.1f} s",
              file=sys.stderr, flush=True)


# -- the test side ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_states")
    env = {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TMPDIR=str(tmp), WANDB_MODE="disabled",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, str(tmp)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    results = {}
    for case in CASES:
        files = [tmp / f"{case_id(case)}.{r}.json" for r in range(case[-1])]
        results[case_id(case)] = [json.loads(f.read_text()) for f in files] if all(f.exists() for f in files) \
            else f"no result (runner exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return results


def expected(case, r: dict) -> dict:
    """What model_state_bytes says each moment should hold."""
    from flowscale.tools.plan import model_state_bytes

    prec, z, opt, ema, n = case
    s = model_state_bytes(r["params"], prec, z, n, opt, ema)
    w = 4 if prec == "fp32" else 2
    persistent = s["parameters"] + s["fp32 master weights"] + s["optimizer moments"] + s["EMA weights"]
    if z == 3:  # ZeRO-3's gradient partition and reduce bucket are allocated at init and kept
        persistent += s["gradients"] + s["gradient buckets"]
        if n > 1:  # the whole copies of its persistent parameters: part of the "gathered" allowance
            persistent += w * r["persistent_param_numel"]
    # ZeRO-0..2 gradients: made in backward, freed by the step; at ZeRO-0 param.grad (w P) is not
    # a model state (the plan counts it with the activations) but is alive here too.
    end = persistent + (s["gradients"] if z < 3 else 0) + (w * r["params"] if z == 0 else 0)
    return {"states": s, "after_step": persistent, "end_of_backward": end}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_state_bytes_match_a_real_deepspeed_engine(measured, case):
    results = measured[case_id(case)]
    assert not isinstance(results, str), results
    prec, z, _, _, n = case
    w = 4 if prec == "fp32" else 2
    for r in results:
        assert r["skipped"] == 0, r
        e = expected(case, r)
        s = e["states"]
        assert set(s) <= {"parameters", "gathered parameters", "gradients", "fp32 master weights", "optimizer moments",
                          "gradient buckets", "EMA weights"}, s  # every part is checked below
        where = f"{case_id(case)} rank {r['rank']} ({r['optimizer_class']}, P={r['params']}): {s}"
        for moment in ("after_step", "end_of_backward"):
            assert abs(r[moment] - e[moment]) <= TOL * e[moment], (moment, r[moment], e[moment], where)
        # The reduce bucket (the largest storage by far): alive in backward at ZeRO-1/2/3 and
        # after the step only at ZeRO-3; none at ZeRO-0.
        if z:
            assert r["backward_largest"] == w * r["reduce_bucket_size"], where
            assert s["gradient buckets"] == w * r["reduce_bucket_size"] * r["bucket_buffers"], (r["bucket_buffers"], where)
            assert (r["after_step_largest"] == s["gradient buckets"]) == (z == 3), where
        else:
            assert "gradient buckets" not in s and r["backward_largest"] < w * r["params"] / 4, where
        if z == 3 and n > 1:
            assert w * r["persistent_param_numel"] <= s["gathered parameters"], where


def test_ema_and_the_moments_of_adamax_are_full_fp32_copies(measured):
    """EMA adds 4 bytes per parameter on every rank; Adamax (exp_avg, exp_inf) holds as much as Adam."""
    with_ema = measured[case_id(("fp32", 0, "adamax", True, 1))]
    without = measured[case_id(("fp32", 0, "adam", False, 1))]
    assert not isinstance(with_ema, str) and not isinstance(without, str), (with_ema, without)
    (with_ema,), (without,) = with_ema, without
    assert with_ema["after_step"] - without["after_step"] == pytest.approx(4 * with_ema["params"], rel=1e-3)


if __name__ == "__main__":
    _run_all(Path(sys.argv[1]))
