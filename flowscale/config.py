"""The typed config tree. Every field has a docstring (shown by ``flowscale train --help``).

Loaded from a YAML file -- a path, or the name of a config bundled with the package
(``flowscale/configs/*.yaml``, listed by ``flowscale train --list-configs``) -- and dotted
command-line overrides::

    flowscale train demo model.levels=2 optim.lr=1e-3
    flowscale train my_configs/run.yaml model.levels=2

Types and ``Literal`` choices are enforced by OmegaConf structured configs; ranges and
cross-field rules by ``__post_init__``. Every problem is raised before any work starts as a
:class:`ConfigError` naming the field and what is allowed. The resolved config is written to
``<run_dir>/config.yaml``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad config key or value; the message names the field and what is allowed."""


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _at_least(cfg, section: str, **minimum) -> None:
    """``_check`` of ``cfg.<name> >= minimum`` for each keyword, named ``section.<name>``."""
    for name, low in minimum.items():
        value = getattr(cfg, name)
        _check(value >= low, f"{section}.{name}", f"must be >= {low}, got {value}")


@dataclass
class ModelConfig:
    preset: Literal["nice", "realnvp", "glow", "dlf", "jet", "tarflow"] = "glow"
    """Architecture family. Fills every layer choice below that is left unset (null):
    nice = additive coupling, reverse permutation, no ActNorm; realnvp = affine coupling with
    tanh-bounded scales, checkerboard then channel masks, fixed N(0,I) priors; glow = ActNorm,
    invertible 1x1 conv, affine coupling with sigmoid(h+2) scales, learned priors; dlf =
    Dynamic Linear Flow: invertible 1x1 conv then a dynamic linear transform (dlt_* fields),
    no ActNorm, learned priors. The transformer flows run on patch_size x patch_size patch
    tokens, one level, N(0,I) prior: jet = Jet, K affine couplings with 2*sigmoid scales whose
    networks are ViTs, a fixed random channel permutation before each channel coupling and every
    jet_spatial_every-th coupling split spatially (checkerboard / stripes); tarflow = TarFlow, K
    causal-transformer autoregressive blocks alternating the token order (vit_* fields set
    their transformers; coupling, mask, permutation, scale_fn, actnorm are unused)."""
    levels: int = 3
    """L, the number of scales (each: squeeze, K steps, split). image_size must be divisible by 2^L.
    jet and tarflow are one-level flows: levels is set to 1 for them."""
    steps: int = 4
    """K, flow steps per level (jet: couplings; tarflow: autoregressive blocks)."""
    width: int = 64
    """Hidden channels of each coupling network (every level, unless widths is set); for a ViT
    network and for tarflow, the transformer width (token embedding size)."""
    widths: Optional[list[int]] = None
    """Hidden channels per level, finest level first (one entry per level), overriding width;
    e.g. [64, 128, 256, 512, 512, 512, 512, 512] keeps the 512x512 level of a 1024px model
    affordable. null = width at every level."""
    coupling: Optional[Literal["additive", "affine", "dynamic_linear"]] = None
    """Coupling kind; null = the preset's choice (nice: additive; realnvp, glow: affine; dlf:
    dynamic_linear, DLF's dynamic linear transform, configured by the dlt_* fields)."""
    mask: Optional[Literal["channel", "checkerboard", "alternate"]] = None
    """Which inputs condition a coupling: channel halves, pixel checkerboard, or alternate =
    checkerboard for the first half of each level's steps then channel (RealNVP). null = preset's."""
    permutation: Optional[Literal["none", "reverse", "shuffle", "invconv", "invconv_lu"]] = None
    """Channel mixing before each coupling; "none" alternates the mask parity instead. null = preset's."""
    scale_fn: Optional[Literal["sigmoid", "tanh", "exp_clamp", "sigmoid2"]] = None
    """Bounded scale of affine couplings: sigmoid(h+2) (Glow), alpha*tanh(h)+beta (RealNVP-style,
    learned alpha, beta), exp of a soft-clamped log-scale, or 2*sigmoid(h) (Jet). null = preset's."""
    clamp: float = 2.0
    """Bound on |log scale| for scale_fn=exp_clamp, and of tarflow's soft-clipped log-scales
    (a = clamp * (2/pi) * atan(raw / clamp))."""
    net: Optional[Literal["conv", "vit"]] = None
    """Coupling network: conv = Glow's conv3x3-conv1x1-conv3x3 of width channels; vit = a ViT
    (patch embedding of vit_patch, vit_depth pre-norm blocks of width channels and vit_heads
    heads, zero-initialised output). null = preset's (jet: vit; others: conv). tarflow's blocks
    are transformers whatever this says (conv is refused)."""
    vit_depth: int = 2
    """Transformer blocks in each ViT coupling network (net=vit, jet) or in each tarflow block."""
    vit_heads: int = 4
    """Attention heads of those transformers; width must be divisible by it."""
    vit_patch: int = 1
    """Patch embedding of a ViT coupling network: it reads vit_patch x vit_patch squares of the
    coupling input as tokens. 1 for jet, whose input is already patch tokens; with glow-style
    presets, each level's spatial size must be divisible by it."""
    patch_size: int = 4
    """jet, tarflow: the image is cut into patch_size x patch_size patches, the tokens of the
    flow (a space-to-depth by patch_size: C*patch_size^2 features each). image_size must be
    divisible by it (jet's spatial couplings also need an even number of patches per side;
    tarflow at least 2 per side: a one-token tarflow would be the identity)."""
    jet_spatial_every: int = 5
    """jet: every n-th coupling splits the tokens spatially (cycling checkerboard, vertical
    stripes, horizontal stripes, each with both parities); the others split the channels after
    a fixed random permutation. 0 = channel couplings only."""
    actnorm: Optional[bool] = None
    """ActNorm at the start of every step. null = preset's (nice: false; realnvp, glow: true)."""
    split_prior: Optional[Literal["learned", "fixed"]] = None
    """Prior on each factored-out half: learned N(mu(z1), sigma(z1)) (Glow) or fixed N(0, I). null = preset's."""
    learn_top: Optional[bool] = None
    """Learned per-channel mean/scale of the top prior (Glow learntop). null = preset's."""
    num_classes: int = 0
    """> 0 makes the top prior class-conditional (Glow ycond) on labels in [0, num_classes)."""
    lu_max_log_s: Optional[float] = None
    """For permutation=invconv_lu: soft bound on |log| of the diagonal of U (conditioning of W); null = unbounded."""
    invconv_bias: bool = False
    """Learned per-channel bias after each invertible 1x1 conv (permutation invconv or invconv_lu;
    DLF uses it for ImageNet 64)."""
    dlt_partitions: int = 2
    """coupling=dynamic_linear: number of channel partitions of each dynamic linear transform (the
    DLF paper's K; model.steps is the number of flow steps per level). 2 = the DLF paper's main models."""
    dlt_split: Literal["equal", "increasing", "decreasing"] = "equal"
    """coupling=dynamic_linear: partition sizes: equal (C/P each), increasing [C/8, C/8, C/4, C/2]
    or decreasing [C/2, C/4, C/8, C/8] (both need dlt_partitions=4)."""
    dlt_decomposition: Literal["parallel_train", "parallel_sample"] = "parallel_train"
    """coupling=dynamic_linear: parallel_train = partition k's scale/shift come from input partition
    k-1 (one-pass forward, sequential inverse); parallel_sample = from output partition k-1
    (sequential forward, one-pass inverse, i.e. fast sampling)."""
    dlt_first: Literal["affine", "identity"] = "affine"
    """coupling=dynamic_linear: partition 1 gets a learned per-channel affine map (plus a projection
    of the label when num_classes > 0), or is left as is (with dlt_partitions=2 that is an affine coupling)."""
    dlt_beta_init: float = -3.0
    """coupling=dynamic_linear: initial beta of log-scales s = alpha*tanh(raw) + beta (learned
    scalars, alpha starts at 1). The DLF reference uses -3."""
    dlt_out_bias: float = 1.0
    """coupling=dynamic_linear: initial bias of each g_k's zero-initialised output conv (and of
    partition 1's learned shift/raw scale), so at init shift = dlt_out_bias and
    s = tanh(dlt_out_bias) + dlt_beta_init. The DLF reference initialises it to 1; 0 gives shift 0, s = beta."""
    spectral_norm: bool = False
    """Bound the spectral norm of the hidden convs of every coupling / g_k network at 1 (their
    ActNorms become plain biases so no learned scale undoes it); a Lipschitz control."""
    seed: int = 0
    """Seed for fixed permutations and the initial 1x1-conv rotations (weights use train.seed)."""

    def level_width(self, level: int) -> int:
        """Hidden width of the coupling networks at ``level`` (0 = finest)."""
        return self.widths[level] if self.widths is not None else self.width

    @property
    def is_patch_flow(self) -> bool:
        """jet and tarflow: one level over patch tokens."""
        return self.preset in ("jet", "tarflow")

    def __post_init__(self):
        if self.is_patch_flow:
            self.levels = 1  # one level over patches (the docstring of levels says so)
        uses_vit = self.preset == "tarflow" or (self.net or ("vit" if self.preset == "jet" else "conv")) == "vit"
        _check(not (self.preset == "tarflow" and self.net == "conv"), "model.net",
               "tarflow's blocks are causal transformers; use net=vit or null")
        if uses_vit:
            _check(self.width % self.vit_heads == 0, "model.vit_heads",
                   f"model.width={self.width} must be divisible by vit_heads={self.vit_heads}")
            _check(self.width % 4 == 0, "model.width",
                   f"a transformer width must be divisible by 4 (2-D sin-cos positions), got {self.width}")
        _at_least(self, "model", vit_depth=1, vit_heads=1, vit_patch=1, patch_size=1)
        _check(self.jet_spatial_every >= 0, "model.jet_spatial_every", f"must be >= 0 (0 = none), got {self.jet_spatial_every}")
        _at_least(self, "model", levels=1, steps=1, width=1)
        _check(self.widths is None or (len(self.widths) == self.levels and all(w >= 1 for w in self.widths)),
               "model.widths", f"needs one width >= 1 per level (model.levels={self.levels}), got {self.widths}")
        _check(self.clamp > 0, "model.clamp", f"must be > 0, got {self.clamp}")
        _at_least(self, "model", num_classes=0, dlt_partitions=2)
        _check(self.dlt_split == "equal" or self.dlt_partitions == 4, "model.dlt_split",
               f"{self.dlt_split} partition sizes need model.dlt_partitions=4, got {self.dlt_partitions}")
        _check(self.lu_max_log_s is None or self.lu_max_log_s > 0, "model.lu_max_log_s",
               f"must be > 0 or null, got {self.lu_max_log_s}")


SHARDS_ONLY = ("train_manifest", "test_manifest", "train_shards", "test_shards")
"""Data fields only data.dataset=shards reads (refused with the demo dataset)."""


@dataclass
class DataConfig:
    dataset: Literal["demo", "shards"] = "demo"
    """Where images come from. demo = crops of the RGB photos bundled with scikit-image (train:
    astronaut, coffee, hubble_deep_field, ihc, motorcycle_left, retina; test: chelsea, rocket),
    written once into shards under data.cache_dir and streamed like any dataset; shards =
    webdataset tar shards made by `flowscale prep` (see train_manifest; shards made elsewhere,
    e.g. by img2dataset or on the HF hub, are converted once with `flowscale prep webdataset`)."""
    train_manifest: Optional[str] = None
    """shards: the train split's manifest.json (or its directory, or an http(s) URL), as written
    by `flowscale prep`. Shards are read next to it unless train_shards is set. With
    dataset=demo this and the other manifest/shards fields are refused, not ignored."""
    test_manifest: Optional[str] = None
    """shards: the test split's manifest.json (or its directory, or a URL); used for test bits/dim."""
    train_shards: Optional[str] = None
    """Where to read the train shards from instead of next to the manifest: local paths, URLs or
    'pipe:' commands, with brace patterns (e.g. https://host/in64/in64-train-{000000..000127}.tar),
    several joined by '::'. File names must match the manifest's. null = next to the manifest."""
    test_shards: Optional[str] = None
    """Like train_shards, for the test split."""
    cache_dir: Optional[str] = None
    """demo: where the demo shards are built on first use; null = $XDG_CACHE_HOME/flowscale
    (default ~/.cache/flowscale)."""
    num_workers: int = 0
    """Loader worker processes per rank; 0 = read in the training process (enough for the demo
    and npy shards; use 4-8 for PNG shards feeding a GPU). With data.streams=0 the sample order
    depends on it: resume with the same value."""
    streams: Optional[int] = None
    """Canonical data streams, fixed when the run is created. With S > 0 the training data is S
    streams, each reading its share of the shards sequentially, and global batch t is
    data.batch_size / S samples of each stream, in stream order: the same images in the same
    order for every world size and data.num_workers such that world size x max(1, num_workers)
    divides S, so the run can resume on any of them. data.batch_size must be a multiple of S.
    E.g. 16 serves 1, 2, 4, 8 or 16 ranks x workers. null (the default) = chosen by a new run
    (printed at start, recorded in its config.yaml; a resume takes the recorded value): the
    largest divisor of data.batch_size that is a multiple of this run's ranks x workers and at
    most max(training shards, 8), see README "Changing the number of GPUs". A checkpoint
    without a recorded value ran with 0 and keeps that order. 0 = off: the order follows the
    ranks x workers of the run, which must then stay the same on resume."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer (shard order is reshuffled every epoch as
    well); 0 or 1 = read shards in order."""
    random_flip: bool = False
    """Flip training images horizontally with probability 1/2 (a function of data.seed, the
    epoch and the sample, so the same under any number of ranks and workers)."""
    bad_data: Literal["error", "skip"] = "error"
    """A bad sample (non-image member, wrong size or mode, bad label) or shard (missing, size unlike
    the manifest's, truncated or corrupt tar, keys or count unlike the manifest's): error = stop
    with an error naming shard and sample (local shards are checked before the first step);
    skip = skip it, print it and count it, once per run however often it is met. A bad shard
    is left out from where it breaks (the whole of it when missing or of the wrong size). A
    split (or a loader worker's share of it) without a single usable image stops with an error
    either way. A .jpg/.webp member means the shards are not flowscale's: its error (and that
    one) gives the `flowscale prep webdataset` command that converts them."""
    max_skipped: int = 100
    """With bad_data=skip: stop with an error once more than this many distinct bad samples and
    shards have been met over the run (a sample met again in a later epoch, or after a resume,
    is not counted again; a bad shard counts one, its samples count in the skipped total)."""
    worker_timeout_s: float = 600.0
    """Give up (error) when a loader worker delivers no batch for this many seconds (e.g. a stalled
    network read); 0 = wait forever."""
    image_size: int = 32
    """Height = width of training images in pixels."""
    channels: int = 3
    """Image channels: 3 = RGB, 1 = grayscale (MNIST, Fashion-MNIST). Must equal the shards'
    manifest ``channels``; bits/dim count D = channels x image_size^2."""
    n_bits: int = 8
    """Bits per colour channel after reduction x -> floor(x / 2^(8 - n_bits)); Glow's CelebA-HQ runs use 5."""
    batch_size: int = 32
    """Images per optimisation step (global batch)."""
    train_size: int = 8192
    """demo: number of training crops drawn (deterministically from data.seed)."""
    test_size: int = 1024
    """demo: number of held-out test crops."""
    seed: int = 0
    """Seed for building the demo crops and for the data order (shard order, shuffle buffers, flips)."""
    noise_std: float = 0.0
    """Gaussian noise augmentation (TarFlow's): training adds N(0, noise_std^2) noise on top of the
    uniform dequantisation (images span [-0.5, 0.5], so TarFlow's 0.05 on [-1, 1] is 0.025 here),
    and sample grids take one score-based denoising step x + noise_std^2 * grad log p(x). The
    training bits/dim logged is then that of the noisy data; test bits/dim is always measured
    with the uniform dequantisation alone, comparable across models. 0 = off."""

    def __post_init__(self):
        _check(1 <= self.n_bits <= 8, "data.n_bits", f"must be in 1..8, got {self.n_bits}")
        _check(self.noise_std >= 0, "data.noise_std", f"must be >= 0 (0 = off), got {self.noise_std}")
        if self.dataset == "shards":
            for split in ("train", "test"):
                _check(bool(getattr(self, f"{split}_manifest")), f"data.{split}_manifest",
                       f"required for data.dataset=shards (the {split} split's manifest.json from `flowscale prep`)")
        else:  # the demo reads none of these: a run must not train on the demo photos while the user meant shards
            for name in SHARDS_ONLY:
                _check(getattr(self, name) is None, f"data.{name}",
                       f"set, but data.dataset=demo does not read it; add data.dataset=shards to train on shards, "
                       f"or drop data.{name} for the demo")
        _at_least(self, "data", num_workers=0, shuffle_buffer=0, max_skipped=0)
        _check(self.streams is None or self.streams >= 0, "data.streams",
               f"must be >= 0 (0 = off) or null (chosen by the run), got {self.streams}")
        _check(not self.streams or self.batch_size % self.streams == 0, "data.streams",
               f"data.batch_size={self.batch_size} must be a multiple of data.streams={self.streams}")
        _check(self.worker_timeout_s >= 0, "data.worker_timeout_s", f"must be >= 0 (0 = no limit), got {self.worker_timeout_s}")
        _at_least(self, "data", image_size=2, channels=1, batch_size=1, train_size=1, test_size=1)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "adamax"] = "adam"
    """Optimizer (torch implementations)."""
    lr: float = 1e-3
    """Peak learning rate, reached after warmup_steps."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr over this many steps (Glow uses warmup; ActNorm-initialised flows need it)."""
    decay: Literal["none", "cosine", "linear", "exponential"] = "none"
    """Learning-rate decay from the end of warmup to train.steps: cosine or linear down to
    min_lr_ratio * lr, or exponential (geometric, lr * min_lr_ratio ** progress; the reference
    DLF decays its learning rate exponentially)."""
    min_lr_ratio: float = 0.0
    """The learning rate at train.steps as a fraction of lr, for decay != none (must be > 0 for
    exponential)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) or L2 penalty (adam, adamax)."""
    grad_clip: float = 50.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam beta1, beta2."""
    ema_decay: float = 0.0
    """Polyak averaging: keep an exponential moving average of the weights with this decay
    (e.g. 0.999), used by eval and sampling; 0 disables it."""
    invconv_l2: float = 0.0
    """L2 penalty on the invertible 1x1-conv weights, added to the bits/dim loss:
    invconv_l2 * sum(W^2) / (2 n) over all n entries of every 1x1-conv W (DLF's --l2_factor,
    0.1 for CelebA-HQ, against 'input is not invertible' NaNs); 0 disables it. See
    flowscale.loss.flow_regularizer."""

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _at_least(self, "optim", warmup_steps=0)
        _check(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", f"each must be in [0, 1), got {self.betas}")
        _check(0 <= self.ema_decay < 1, "optim.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.invconv_l2 >= 0, "optim.invconv_l2", f"must be >= 0 (0 = off), got {self.invconv_l2}")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _check(not (self.decay == "exponential" and self.min_lr_ratio <= 0), "optim.min_lr_ratio",
               "must be > 0 with optim.decay=exponential (the LR at the end, e.g. 0.01)")


@dataclass
class EngineConfig:
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 = plain data parallel, 1 = shard optimizer state, 2 = + gradients,
    3 = + parameters."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. bf16 keeps fp32 master weights (and log-dets stay fp32);
    fp16 needs a GPU (not supported by DeepSpeed on CPU)."""
    grad_accum: int = 1
    """Gradient accumulation steps. Per-rank micro-batch = data.batch_size / (world size * grad_accum)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl on GPU, gloo on CPU."""
    max_bad_steps: int = 5
    """A step with a non-finite loss is skipped (and counted); this many in a row are a divergence
    (train.on_divergence: rolled back, or a stop with an error naming the step). No checkpoint is
    written from bad weights."""
    threads: int = 0
    """Intra-op CPU threads per process (torch.set_num_threads). 0 = automatic: OMP_NUM_THREADS
    when the launcher set it (torchrun sets 1), else the CPUs of this process's affinity mask
    (at most SLURM_CPUS_PER_TASK; divided among the node's tasks when they share one mask) less
    one per data.num_workers, at least 1. The choice is printed once at start."""
    overlap_comm: Optional[bool] = None
    """ZeRO-1/2/3: reduce (and, at ZeRO-3, gather) in the background while backward computes.
    null = DeepSpeed's recommendation for the stage: true at ZeRO-2 (its ZeRO-2 tutorial) and
    ZeRO-3 (its default there), false at ZeRO-1. Costs 4.5x reduce_bucket_size of buffers at
    ZeRO-2. Ignored at ZeRO-0 (plain all-reduce after backward)."""
    contiguous_gradients: Optional[bool] = None
    """ZeRO-1/2/3: copy each gradient into one pre-allocated buffer as it is produced (no
    fragmentation at the backward peak). null = true, DeepSpeed's default and recommendation."""
    reduce_bucket_size: Optional[int] = None
    """ZeRO-1/2/3: elements reduced at a time (the gradient bucket, w bytes per element). null =
    DeepSpeed's default 5e8; smaller buckets start communication earlier and hold less memory,
    at more collective calls."""
    allgather_bucket_size: Optional[int] = None
    """ZeRO-1/2: elements all-gathered at a time after the step (updated parameter partitions).
    null = DeepSpeed's default 5e8."""
    prefetch_bucket_size: Optional[int] = None
    """ZeRO-3: parameter elements gathered ahead of their use (stage3_prefetch_bucket_size); 0 =
    no prefetching. null = DeepSpeed's default 5e7."""
    param_persistence_threshold: Optional[int] = None
    """ZeRO-3: parameters of at most this many elements stay whole on every rank instead of being
    gathered at each use (stage3_param_persistence_threshold); 0 = partition everything. null =
    DeepSpeed's default 1e5."""
    max_live_parameters: Optional[int] = None
    """ZeRO-3: at most this many gathered parameter elements are held at once
    (stage3_max_live_parameters). null = DeepSpeed's default 1e9."""
    compile: bool = False
    """torch.compile each coupling network in place, after the ActNorm init (parameter names and
    checkpoints unchanged; inverse recompute runs the compiled networks in its backward too). The
    first steps pay the compilation. Off by default: on 2 CPU cores it gained 2% at width 512
    and lost 7% at width 64 (issue 14); for a GPU, measure with
    ``flowscale bench gpu --override engine.compile=true``. Not with zero_stage=3."""

    def __post_init__(self):
        _check(not (self.compile and self.zero_stage == 3), "engine.compile",
               "torch.compile of the coupling networks is not supported with engine.zero_stage=3 "
               "(parameters are gathered in module hooks); use stage 0-2 or set false")
        _check(self.zero_stage in (0, 1, 2, 3), "engine.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _at_least(self, "engine", grad_accum=1, max_bad_steps=1)
        _check(self.threads >= 0, "engine.threads", f"must be >= 0 (0 = automatic), got {self.threads}")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "max_live_parameters"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"engine.{name}", f"must be >= 1 element or null (DeepSpeed's default), got {v}")
        for name in ("prefetch_bucket_size", "param_persistence_threshold"):
            v = getattr(self, name)
            _check(v is None or v >= 0, f"engine.{name}", f"must be >= 0 or null (DeepSpeed's default), got {v}")


@dataclass
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """Weights & Biases mode. offline writes the run under <run_dir>/wandb for a later `wandb sync`
    (the run says where, and the exact command, when it starts and ends); online needs WANDB_API_KEY in the environment (it is never written to configs, logs or checkpoints)."""
    project: str = "flowscale"
    """W&B project name."""
    entity: Optional[str] = None
    """W&B entity (team or user); null = your default."""
    name: Optional[str] = None
    """Run display name; null = the run directory's name."""
    log_images: bool = True
    """Log sample grids as wandb.Image at every sampling step (captioned with each row's temperature);
    false = the PNGs under <run_dir>/samples only."""


@dataclass
class MemoryConfig:
    inverse_recompute: bool = False
    """Memory-saving backprop: keep only each level's output and rebuild activations in backward
    by running the steps' inverses (activation memory flat in model.steps)."""
    recompute_levels: Optional[list[int]] = None
    """Levels (0 = finest) that use inverse recompute; null = all levels."""
    checkpoint_steps: bool = False
    """torch.utils.checkpoint around every flow step (tarflow: every block): backward keeps each
    step's input and reruns the step forward (activation memory still grows with model.steps,
    but by one input per step instead of every intermediate). For flows whose inverse is too
    slow for inverse_recompute (tarflow); not together with it."""
    max_reconstruction_error: Optional[float] = None
    """A step whose relative reconstruction error |x - f^-1(f(x))| / |x| exceeds this (on any
    rank) is not recomputed (see on_unstable; checked every check_every steps). null = follow
    the precision: max(1e-3, 4 * eps) with eps the machine epsilon of engine.precision, i.e.
    1e-3 in fp32, 3.1e-2 in bf16, 3.9e-3 in fp16. Why: a reconstruction error perturbs the
    activations a step's backward sees by that relative amount, so the gradient by about as
    much; plain bf16 training already lives with gradient errors of ~3 eps against fp32
    (flowscale bench zero: 2.1e-2), and healthy steps reconstruct to within 1 eps in bf16
    (measured <= 6e-3) and 2 eps in fp32 (<= 2.2e-7); fp32 keeps the 1e-3 floor."""
    on_unstable: Literal["store", "error"] = "store"
    """What inverse recompute does with a step whose reconstruction error exceeds
    max_reconstruction_error: store = run it with ordinary autograd, keeping its activations
    (logged once whenever the set changes: how many steps, on which levels, and the bytes they
    add; W&B gets health/recon_stored_steps and health/recon_stored_mib); error = stop with one line naming
    the steps, so memory never silently grows."""
    check_every: int = 100
    """Measure reconstruction errors (logged as health/recon_err/level_i) every this many steps; 0 = never."""
    check_batch_size: int = 8
    """Images used for the reconstruction check."""

    def __post_init__(self):
        _check(self.max_reconstruction_error is None or self.max_reconstruction_error > 0,
               "memory.max_reconstruction_error", f"must be > 0 or null (follow the precision), got {self.max_reconstruction_error}")
        _at_least(self, "memory", check_every=0, check_batch_size=1)


@dataclass
class DivergenceConfig:
    """The divergence watch (flowscale/divergence.py; README: Divergence). Defaults measured on
    normal demo and Glow/RealNVP Fashion-MNIST runs (README): none of them fires there."""
    watch: bool = True
    """Watch bits/dim spikes, gradient-norm blow-ups and the health check's bands. false = only
    engine.max_bad_steps vetoed (non-finite) steps in a row count as divergence (as before)."""
    warmup_steps: int = 100
    """Clean steps whose bits/dim and gradient norm enter the running statistics before the spike
    and gradient checks arm (early training falls faster than any running mean follows)."""
    ema_decay: float = 0.98
    """Decay of the running mean/variance of bits/dim and of the running gradient norm (memory
    of about 1 / (1 - decay) = 50 steps)."""
    spike_sigmas: float = 6.0
    """A step is a spike when bits/dim > running mean + max(spike_sigmas * running std, spike_margin)."""
    spike_margin: float = 0.5
    """The least margin (bits/dim) above the running mean that counts as a spike; 0 = no spike check."""
    grad_factor: float = 20.0
    """A step's gradient norm (before clipping) above this many times its running mean flags it;
    0 = no gradient check."""
    patience: int = 3
    """Flagged steps (spike, gradient, non-finite) in a row that make a divergence."""
    max_reconstruction_error: float = 0.1
    """At a health check (memory.check_every), a relative reconstruction error |x - f^-1(f(x))|/|x|
    above this declares divergence at once (healthy: <= 2.2e-7 fp32, <= 6e-3 bf16; the
    recompute tolerance memory.max_reconstruction_error is far below); 0 = off."""
    max_logdet_per_dim: float = 20.0
    """At a health check, a flow step whose |log-det| per dimension exceeds this declares
    divergence at once (a step that expands or contracts volume by e^20 per dimension); 0 = off."""
    max_rollbacks: int = 3
    """train.on_divergence=rollback: rollbacks allowed in one run; one more divergence stops it."""
    max_rollbacks_per_window: int = 2
    """Rollbacks allowed to the same checkpoint: diverging again past it after this many (each
    with a skipped window and a lowered LR) stops the run."""
    lr_factor: float = 0.5
    """After a rollback, the LR of the next lr_steps steps is multiplied by this (1 = unchanged;
    a second rollback to the same checkpoint multiplies it again)."""
    lr_steps: int = 250
    """Steps after a rollback that run with the lowered LR."""

    def __post_init__(self):
        _check(0 < self.ema_decay < 1, "divergence.ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        _check(0 < self.lr_factor <= 1, "divergence.lr_factor", f"must be in (0, 1], got {self.lr_factor}")
        for name in ("spike_sigmas", "spike_margin", "grad_factor", "max_reconstruction_error", "max_logdet_per_dim"):
            _check(getattr(self, name) >= 0, f"divergence.{name}", f"must be >= 0 (0 = off), got {getattr(self, name)}")
        _at_least(self, "divergence", warmup_steps=0, patience=1, max_rollbacks=0, max_rollbacks_per_window=1,
                  lr_steps=0)


@dataclass
class TrainConfig:
    steps: int = 500
    """Optimisation steps to run (the loop stops at this global step)."""
    run_dir: str = "runs/demo"
    """Directory for config.yaml, checkpoints, samples and logs. Re-running resumes from it."""
    seed: int = 0
    """Seed for weight init, dequantisation noise and sampling."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    log_every: int = 50
    """Print train bits/dim every this many steps."""
    eval_every: int = 250
    """Compute test bits/dim every this many steps (and at the end); 0 = only at the end."""
    sample_every: int = 250
    """Write a sample grid PNG every this many steps (and at the end); 0 = only at the end."""
    checkpoint_every: int = 250
    """Save a checkpoint every this many steps (and at the end)."""
    checkpoint_minutes: float = 0.0
    """Also save when this many minutes have passed since the last save (0 = off); useful under
    Slurm time limits."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted)."""
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    """Sampling temperatures for the sample grids."""
    init_batch_size: int = 256
    """Images used for the data-dependent ActNorm initialisation."""
    bound_images: int = 0
    """At the start of a run, compute the linear-flow bound (`flowscale bound`: the best bits/dim any
    linear flow with a Gaussian base reaches) from this many train images and log it as
    train/linear_bound_bpd beside bits/dim; 0 = skip. Needs more images than C*H*W dimensions."""
    progress: bool = True
    """Show a tqdm progress bar when stdout is a terminal (plain log lines otherwise)."""
    record_batches: bool = False
    """Audit the data order: every rank appends, per step, a fingerprint of each image of its
    batch (64-bit BLAKE2b of its uint8 pixels, after the flip) to
    ``run_dir/batches/rank_XXXXX.jsonl``; records past the step a run resumes from are moved to
    ``batches/superseded.jsonl``. :func:`flowscale.analysis.audit.batch_keys` maps them to sample keys."""
    on_divergence: Literal["rollback", "abort"] = "rollback"
    """What a divergence (see the divergence section) does. rollback = restore the newest
    checkpoint written while healthy, skip the data of the diverged window, lower the LR for a
    while (divergence.lr_factor) and continue, within divergence.max_rollbacks; abort = stop
    with one line and exit code 1. Rollback by default: an aborted job that Slurm requeues
    resumes into the same divergence, while a rollback costs only the steps since that
    checkpoint and the skipped batches, and every one is logged."""

    def __post_init__(self):
        _at_least(self, "train", steps=1)
        for name in ("log_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "sample_every"):
            _check(getattr(self, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        _at_least(self, "train", keep_last=1)
        _check(all(t >= 0 for t in self.temperatures), "train.temperatures", f"must be >= 0, got {self.temperatures}")
        _at_least(self, "train", init_batch_size=1)
        _check(self.bound_images >= 0, "train.bound_images", f"must be >= 0 (0 = off), got {self.bound_images}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The flow architecture."""
    data: DataConfig = field(default_factory=DataConfig)
    """Images, bit depth, batch size."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Memory-saving options."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """DeepSpeed: ZeRO stage, precision, gradient accumulation, step guards."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases tracking."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop, run directory, logging and checkpoint cadence."""
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    """The divergence watch: what counts as diverged, and the limits on rollbacks."""

    def __post_init__(self):
        _check(not (self.engine.zero_stage == 3 and self.optim.ema_decay > 0), "optim.ema_decay",
               "EMA weights are not supported with engine.zero_stage=3 (parameters are sharded); use stage 0-2 or set 0")
        _check(not (self.engine.zero_stage == 3 and self.optim.invconv_l2 > 0), "optim.invconv_l2",
               "the 1x1-conv L2 penalty needs full weights, not supported with engine.zero_stage=3; use stage 0-2 or set 0")
        for lvl in self.memory.recompute_levels or []:
            _check(0 <= lvl < self.model.levels, "memory.recompute_levels",
                   f"level {lvl} does not exist; model.levels={self.model.levels} (levels are 0..{self.model.levels - 1})")
        size, levels = self.data.image_size, self.model.levels
        m = self.model
        if m.is_patch_flow:
            _check(size % m.patch_size == 0, "model.patch_size",
                   f"data.image_size={size} must be divisible by patch_size={m.patch_size}")
            # Each block's first token gets (mu, a) = (0, 0): with one token every block is the identity.
            _check(m.preset != "tarflow" or size // m.patch_size >= 2, "model.patch_size",
                   f"tarflow needs at least 2x2 patch tokens, but patch_size={m.patch_size} cuts data.image_size={size} "
                   f"into one, which every block leaves unchanged (the first token of an autoregressive block is "
                   f"never transformed); use patch_size <= {size // 2}")
            spatial = m.preset == "jet" and m.jet_spatial_every > 0 and m.steps >= m.jet_spatial_every
            _check(not spatial or (size // m.patch_size) % 2 == 0, "model.patch_size",
                   f"jet's spatial couplings need an even number of patches per side, got "
                   f"{size}/{m.patch_size} = {size // m.patch_size}; change patch_size or set jet_spatial_every=0")
        else:
            _check(size % (2 ** levels) == 0, "model.levels",
                   f"data.image_size={size} must be divisible by 2^levels={2 ** levels}; lower model.levels or change the size")
        # TarFlow's inverse is sequential (one transformer pass per token): rebuilding
        # activations through it in every backward would cost N forward passes per block.
        _check(not (m.preset == "tarflow" and self.memory.inverse_recompute), "memory.inverse_recompute",
               "not supported with model.preset=tarflow (its inverse is sequential over the tokens, so recomputing "
               "through it costs one transformer pass per token); use plain autograd (false), or "
               "memory.checkpoint_steps=true to save activation memory")
        _check(not (self.memory.inverse_recompute and self.memory.checkpoint_steps), "memory.checkpoint_steps",
               "choose one of memory.inverse_recompute and memory.checkpoint_steps")


# -- loading ---------------------------------------------------------------------------------

def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).split("\n")[0]
    return f"config field '{key}': {msg}"


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The bundled configs: package data, so an installed (non-editable) flowscale has them too.
In a source checkout the top-level ``configs`` is a symlink to this directory."""


def list_configs() -> dict[str, Path]:
    """{name: path} of every bundled config, sorted by name (``demo``, ``glow_imagenet32``, ...)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def config_summary(path: str | Path) -> str:
    """The first line of a config's opening comment: what it is (e.g. 'Glow on ImageNet 32x32 ...')."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return line.lstrip("# ").strip() if line.lstrip().startswith("#") else ""
    return ""


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file a config argument means: an existing file wins; otherwise a bare name (with
    or without ``.yaml``) of a bundled config. Anything else is a :class:`ConfigError` that lists
    the bundled names."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = list_configs()
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    is_name = p.parent == Path(".") and not p.is_absolute()
    if is_name and stem in bundled:
        return bundled[stem]
    names = ", ".join(bundled) or "(none)"
    hint = f"; did you mean the bundled config '{stem}'?" if stem in bundled else ""
    what = (f"config '{name_or_path}' not found: no such file, and no bundled config has that name" if is_name
            else f"config file '{name_or_path}' not found{hint}")
    raise ConfigError(f"{what} (bundled configs: {names}; `flowscale train --list-configs` describes them)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (optional; a path or a bundled config's name, see :func:`config_path`)
    <- ``key.sub=value`` overrides; validated to a Config."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            p = config_path(path)
            loaded = OmegaConf.load(p)
            if loaded is None or not hasattr(loaded, "keys"):
                raise ConfigError(f"config file '{p}' must hold a mapping of sections (model:, data:, ...)")
            layers.append(loaded)
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override '{o}' must look like section.field=value, e.g. model.levels=2")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e)) from None


def from_dict(d: dict) -> Config:
    """A Config from a plain dict (as saved in checkpoints), validated like a YAML file."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d)))
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e)) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


# -- field docs (for --help and the docstring test) -----------------------------------------

def field_docs(cls) -> dict[str, str]:
    """{field name: its attribute docstring} for a config dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_fields(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every leaf field of the tree."""
    rows = []
    docs = field_docs(cls)
    default = cls()
    for f in fields(cls):
        value = getattr(default, f.name)
        if is_dataclass(value):
            rows.extend(describe_fields(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
    return rows
