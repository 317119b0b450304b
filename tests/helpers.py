"""The test suite's shared helpers, in one place (fixtures live in conftest.py). Test modules
import from here, never from each other (tests/test_suite_rules.py checks it).

- flows: small models pushed away from their identity initialisation, losses and gradients;
- the invertible contract: brute-force float64 Jacobians, round trips, log-det checks;
- data files: images whose pixels identify them, shard splits written with the production
  writer, hand-made TFRecords;
- runs: a free port, a clean environment for child processes, the training command, and what
  a finished run left (weights, metrics).
"""

from __future__ import annotations

import gzip
import os
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowscale.config import ModelConfig
from flowscale.flows.actnorm import initialize_actnorm
from flowscale.flows.models import build_flow
from flowscale.loss import flow_bpd_dequantized

# -- flows -----------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so no layer is the identity: zero-initialised tensors get
    N(0, scale^2), others noise relative to their own spread."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        spread = p.detach().double().std().item() if p.numel() > 1 else 0.0
        if spread <= 1e-8:  # zero-initialised: unit-variance output per unit-variance input
            spread = 1.0 / (p[0].numel() ** 0.5) if p.dim() >= 2 else 1.0
        p.add_(noise * scale * spread)
    return module


def small_flow(preset: str = "glow", levels: int = 2, steps: int = 2, width: int = 8, channels: int = 3,
               size: int = 8, dtype=torch.float64, seed: int = 0, scale: float = 0.1, **overrides):
    """A tiny multi-scale flow, ActNorm-initialised on random data and perturbed."""
    torch.manual_seed(seed)
    flow = build_flow(ModelConfig(preset=preset, levels=levels, steps=steps, width=width, **overrides),
                      channels, size).to(dtype)
    x = torch.rand(16, channels, size, size, dtype=dtype) - 0.5
    n_classes = overrides.get("num_classes", 0)
    y = torch.arange(16) % n_classes if n_classes else None
    initialize_actnorm(flow, x, cond=y)
    return perturb_(flow, scale, seed)


def loss_and_grads(flow, x, micro_batches=1):
    flow.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    total = 0.0
    for chunk in xr.chunk(micro_batches):
        loss = flow_bpd_dequantized(flow, chunk, 8)[0].sum()
        loss.backward()
        total += loss.item()
    return total, xr.grad, {n: p.grad.clone() for n, p in flow.named_parameters() if p.grad is not None}


def worst_relative_difference(ga, gb):
    assert ga.keys() == gb.keys()
    return max(((ga[k] - gb[k]).norm() / ga[k].norm().clamp_min(1e-30)).item() for k in ga)


def assert_same_loss_and_gradients(plain, wrapped, x, tol: float) -> None:
    """``wrapped`` (e.g. under inverse recompute) gives ``plain``'s bits/dim, input gradient and
    every parameter's gradient, each within ``tol`` relative (the loss within 1e-6)."""
    la, gxa, ga = loss_and_grads(plain, x)
    lb, gxb, gb = loss_and_grads(wrapped, x)
    assert abs(la - lb) <= 1e-6 * abs(la)
    assert ((gxa - gxb).norm() / gxa.norm()).item() < tol
    assert len(ga) == len(list(plain.parameters())), "every parameter must get a gradient"
    assert worst_relative_difference(ga, gb) < tol


# -- the invertible contract ----------------------------------------------------------------------


def randn(shape, seed: int = 0) -> torch.Tensor:
    """N(0, 1) data of ``shape`` in the default dtype, the same for the same seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def jacobian(fn, x):
    """The float64 Jacobian [D_out, D_in] of ``fn`` at the single sample x [1, ...], by brute
    force in one batched pass: x repeated D_in times, backward with the identity as output
    gradient (each sample depends on its own input only), so row i is d out_i / dx."""
    n = x.numel()
    xs = x.detach().repeat(n, *([1] * (x.dim() - 1))).requires_grad_(True)
    out = fn(xs).reshape(n, -1)
    assert out.shape == (n, n)
    out.backward(torch.eye(n, dtype=out.dtype))
    return xs.grad.reshape(n, n)


def brute_force_logdet(fn, x):
    """[B] log|det df/dx| per sample from the full float64 Jacobian. ``fn`` maps a batch to a
    batch of the same size, each sample on its own (it is called on copies of one sample)."""
    return torch.stack([torch.linalg.slogdet(jacobian(fn, x[i:i + 1]))[1] for i in range(x.shape[0])])


def _repeat(cond, n: int):
    """A one-sample condition (labels [1] or a tensor [1, ...]) for a batch of n copies."""
    return None if cond is None else cond.expand(n, *cond.shape[1:])


def assert_jacobian(layer, x, cond=None, tol: float = 1e-8):
    """The layer's log-det equals the brute-force one, sample by sample; returns the log-det [B]."""
    _, ld = layer(x, cond=cond)
    for i in range(x.shape[0]):
        ci = None if cond is None else cond[i:i + 1]
        bf = brute_force_logdet(lambda v: layer(v, cond=_repeat(ci, len(v)))[0], x[i:i + 1])
        assert abs(bf.item() - ld[i].item()) < tol, f"sample {i}: brute force {bf.item()} vs layer {ld[i].item()}"
    return ld


def round_trip(layer, x, cond=None, tol=1e-9):
    """inverse(forward(x)) == x, logdet(forward) == -logdet(inverse), and ``layer.inverse`` is
    ``layer(..., reverse=True)``; returns (z, logdet)."""
    z, ld = layer(x, cond=cond)
    assert ld.shape == (x.shape[0],) and ld.dtype == torch.float64
    x_back, ld_inv = layer(z, cond=cond, reverse=True)
    assert (x - x_back).abs().max().item() < tol, "round trip"
    assert (ld + ld_inv).abs().max().item() < tol, "logdet(forward) != -logdet(inverse)"
    x_back2, ld_inv2 = layer.inverse(z, cond=cond)
    assert torch.equal(x_back, x_back2) and torch.equal(ld_inv, ld_inv2)
    return z, ld


def flat_model(flow, x):
    """A whole flow as one map [B, C, H, W] -> [B, D]: its latents of every level, flattened and joined."""
    eps, _ = flow(x)
    return torch.cat([e.reshape(x.shape[0], -1) for e in eps], dim=1)


# -- data files ------------------------------------------------------------------------------------


def tagged_image(i: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """uint8 [size, size, C]: noise from seed i with the id i written into the first pixel row."""
    x = np.random.default_rng(i).integers(0, 256, (size, size, channels), dtype=np.uint8)
    x[0, 0, 0], x[0, 1, 0], x[0, 2, 0] = i % 256, (i // 256) % 256, 77
    return x


def image_id(x_chw) -> int:
    """The id of a (possibly horizontally flipped) tagged image, from a [C, H, W] tensor/array."""
    x = np.asarray(x_chw)
    if x[0, 0, 2] != 77:  # flipped: the tag row reads right to left
        x = x[:, :, ::-1]
    assert x[0, 0, 2] == 77, "not a tagged image"
    return int(x[0, 0, 0]) + 256 * int(x[0, 0, 1])


def write_split(split_dir: Path, counts: list[int], size: int = 8, encoding: str = "npy", labels: bool = True,
                prefix: str = "t", split: str = "train", members=None):
    """Shards of tagged images (ids 0..N-1, label = id) with ``counts[k]`` samples in shard k,
    written with the production writer; returns the Manifest. ``members(i, key, default_members)``
    may replace a sample's tar members to make bad data; the manifest then describes the files
    as written (sizes, hashes)."""
    from flowscale.data.codec import encode_sample
    from flowscale.data.manifest import Manifest, ShardEntry, shard_name, write_manifest
    from flowscale.data.tar import TarWriter

    split_dir.mkdir(parents=True, exist_ok=True)
    entries, i = [], 0
    for k, n in enumerate(counts):
        name = shard_name(prefix, split, k)
        w = TarWriter(split_dir / name)
        keys = []
        for _ in range(n):
            key = f"s{i:06d}"
            ms = encode_sample(key, tagged_image(i, size), encoding, i if labels else None)
            if members is not None:
                ms = members(i, key, ms)
            for mname, data in ms:
                w.add(mname, data)
            keys.append(key)
            i += 1
        nbytes, digest = w.close()
        entries.append(ShardEntry(name, n, nbytes, digest, keys[0], keys[-1]))
    m = Manifest(dataset="test", variant="tagged", split=split, resolution=size, channels=3, encoding=encoding,
                 num_samples=sum(counts), labels=labels, num_classes=sum(counts) if labels else 0, shards=entries)
    write_manifest(m, split_dir)
    return m


def data_cfg(train_dir, test_dir=None, **kw):
    """A DataConfig reading the shards written by :func:`write_split` (8x8 images, batches of 4), in
    the per-rank order (data.streams=0) unless ``streams`` is given (None: the run's choice)."""
    from flowscale.config import DataConfig

    args = dict(dataset="shards", train_manifest=str(train_dir), test_manifest=str(test_dir or train_dir),
                image_size=8, batch_size=4, num_workers=0, shuffle_buffer=8, streams=0)
    args.update(kw)
    return DataConfig(**args)


def write_tfrecord(path: Path, examples: list[dict]) -> None:
    """A TFRecord of tf.train.Example protobufs, encoded here by hand from the wire format.
    ``examples``: feature name -> bytes (a bytes_list) or a list of ints (an int64_list)."""
    from data_prep.tfrecord import masked_crc

    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out

    def ld(field, payload):
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    with open(path, "wb") as f:
        for ex in examples:
            feats = b""
            for name, value in ex.items():
                if isinstance(value, bytes):
                    feature = ld(1, ld(1, value))
                else:
                    feature = ld(3, ld(1, b"".join(varint(v) for v in value)))
                feats += ld(1, ld(1, name.encode()) + ld(2, feature))
            data = ld(1, feats)
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", masked_crc(head)) + data + struct.pack("<I", masked_crc(data)))


# -- runs ------------------------------------------------------------------------------------------

SMALL_RUN = ["model.levels=2", "model.steps=2", "model.width=16", "data.train_size=512", "data.test_size=64",
             "data.batch_size=16", "train.init_batch_size=64", "train.progress=false", "wandb.mode=disabled",
             "train.eval_every=0", "train.sample_every=0", "train.log_every=1", "optim.warmup_steps=2"]
"""A small demo training (a loss logged every step, no eval or samples) for multi-process and Slurm runs."""

JOB_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")
"""What makes a process one rank of a job: never inherited by a run a test starts."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_env(monkeypatch, *names):
    """Remove variables for one test AND restore their absence afterwards: a value set while the
    test runs must not leak into later tests. (A plain delenv of an absent variable records
    nothing to undo.)"""
    for k in names:
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)


def child_env(tmp_path, kill_at: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a run started in a child process: this one's minus the job variables
    (:data:`JOB_VARIABLES`) and any armed crash point, on the CPU, one intra-op thread, temporary
    files under ``tmp_path``, unbuffered output. ``kill_at``: a crash point of
    flowscale.checkpoint to arm (SIGKILL inside a save, "point@step[:rank]")."""
    env = {k: v for k, v in os.environ.items() if k not in (*JOB_VARIABLES, "FLOWSCALE_KILL_AT")}
    env.update(DS_ACCELERATOR="cpu", TMPDIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    if kill_at:
        env["FLOWSCALE_KILL_AT"] = kill_at
    return env


def train_command(*overrides: str, nproc: int = 1) -> list[str]:
    """``flowscale train OVERRIDES`` as a command: this interpreter, through torchrun (a free
    port on this machine) for ``nproc`` > 1."""
    args = ["-m", "flowscale.cli", "train", *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", *args]


def final_weights(run_dir, ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a run's newest complete checkpoint (with ``ema``: also its EMA
    weights, under "ema.<name>")."""
    from safetensors.torch import load_file

    from flowscale.checkpoint import list_complete

    last = list_complete(run_dir)[-1]
    weights = load_file(str(last / "model.safetensors"))
    if ema:
        weights.update({f"ema.{k}": v for k, v in load_file(str(last / "ema.safetensors")).items()})
    return weights


def last_by_step(run_dir, key="train/bpd") -> dict[int, float]:
    """step -> the last value of metric ``key`` logged for it."""
    from flowscale.logging import read_metrics

    out = {}
    for r in read_metrics(run_dir):
        if key in r:
            out[r["step"]] = r[key]
    return out


def wandb_records(path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``), as wandb's own protobuf
    ``Record`` messages (wandb.proto.wandb_internal_pb2). wandb 0.31 keeps no Python reader of
    the file (its writer and reader are in wandb-core, in Go), so the framing is read here: a
    7-byte header (":W&B", magic, version), then LevelDB's log format, 32 KiB blocks of chunks
    (crc32 4 bytes, length 2, type 1: full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        pending = (b"" if kind in (1, 2) else pending) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wait_for(predicate, timeout, what, job=None):
    """Poll ``predicate``; a submitit ``job`` that ends meanwhile fails the wait at once with its error."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        if job is not None and job.done() and not predicate():
            job.results()  # raises the job's exception
            raise AssertionError(f"the job finished before {what}")
        time.sleep(0.5)


def gray_crops(n: int, size: int, seed: int) -> np.ndarray:
    """n real grayscale photo crops, uint8 [n, size, size] (PIL's luma of the demo crops)."""
    from PIL import Image

    from flowscale.data import demo_images

    rgb = demo_images("train", n, size, seed=seed).permute(0, 2, 3, 1).numpy()
    return np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    """An IDX file as MNIST ships them: 0x0000 08 <ndim>, big-endian uint32 dims, the uint8 values."""
    data = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(root: Path, n_train: int = 20, n_test: int = 8, gz_train: bool = True, gz_test: bool = False):
    """MNIST-format files (train gzipped, t10k raw by default); returns {split: (images, labels)}."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, split, n, gz, seed in (("train", "train", n_train, gz_train, 1), ("t10k", "test", n_test, gz_test, 2)):
        x, y = gray_crops(n, 28, seed), (np.arange(n) * 7 % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", x, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", y, gz)
        out[split] = (x, y)
    return out


def imported_packages(path) -> set[str]:
    """The top-level names of every absolute import in the Python file ``path`` (anywhere in it,
    inside functions too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names
