"""The latent space of a trained flow: encode, decode, interpolate, attribute directions,
temperature sweeps. Single device, no DeepSpeed: anything built by :func:`flowscale.checkpoint.load_trained`
(EMA weights when the run kept them) or :func:`flowscale.flows.models.build_flow`.

The multi-scale flow is one bijection (the priors are its last layers, :mod:`flowscale.priors`)::

    x = preprocess(x_uint8)  (bin centres, no noise)      eps = [eps_1, ..., eps_L] = flow(x, y)
    x_uint8' = postprocess(flow^{-1}(eps, y))

``eps_l`` [N, C_l, H_l, W_l] are standard normal under the model; eps_1 is the finest level (the first
split), eps_L the coarsest (the top). Because x uses bin centres, decode(encode(x)) returns the same
pixels up to floating point: :func:`reconstruction_error` says by how many n-bit levels it does not.

Every operation works on chunks of ``chunk`` images so that memory stays bounded at any resolution
(1024 px: a chunk of 1-4); latents are returned on the CPU in float32 whatever the flow's device and
dtype (fp32 or bf16: the flow's own parameter dtype is used for its inputs). Class-conditional models
take labels ``y`` [N] (or one int for all).

Operations on latents (lists of per-level tensors, batch first):

* :func:`interpolate`: between consecutive anchors, ``linear`` or ``spherical`` per level
  (slerp of the direction, linear in the norm, so differing norms are interpolated too);
  ``fix_coarse`` keeps the coarsest levels at the first anchor's value (change the details only).
* :func:`attribute_direction`: Glow's recipe, mean top-level eps of images with the attribute minus
  the mean of those without (``per_level=True``: every level); accumulated over streamed batches.
* :func:`manipulate`: eps + scale * direction for a list of scales.
* :func:`temperature_sweep`: the same draws at several temperatures, on all levels or one level.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch

from .. import seeds
from ..data.quantize import postprocess, preprocess, reduce_bits

Latents = list[torch.Tensor]
"""Per-level eps, finest first: [eps_1 [N, C_1, H_1, W_1], ..., eps_L [N, C_L, H_L, W_L]]."""


def _flow_device_dtype(flow) -> tuple[torch.device, torch.dtype]:
    p = next(flow.parameters())
    return p.device, p.dtype


def _labels(y, n: int) -> torch.Tensor | None:
    if y is None:
        return None
    if isinstance(y, int):
        return torch.full((n,), y, dtype=torch.int64)
    y = torch.as_tensor(y, dtype=torch.int64)
    if y.shape != (n,):
        raise ValueError(f"labels y must be one int or [{n}] int64, got shape {tuple(y.shape)}")
    return y


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


@torch.no_grad()
def encode(flow, images_uint8: torch.Tensor, n_bits: int, y=None, chunk: int = 64) -> Latents:
    """uint8 images [N, C, H, W] -> per-level eps (float32, CPU), ``chunk`` images at a time.

    x is the bin centre of each n-bit pixel (no dequantisation noise), so encoding is deterministic
    and decodes back to the same pixels."""
    _check_chunk(chunk)
    device, dtype = _flow_device_dtype(flow)
    y = _labels(y, len(images_uint8))
    parts: list[list[torch.Tensor]] = []
    for s in range(0, len(images_uint8), chunk):
        x = preprocess(images_uint8[s:s + chunk], n_bits, noise=False).to(device, dtype)
        cond = None if y is None else y[s:s + chunk].to(device)
        eps, _ = flow(x, cond=cond)
        parts.append([e.float().cpu() for e in eps])
    return [torch.cat(level) for level in zip(*parts)]


@torch.no_grad()
def decode(flow, latents: Latents, n_bits: int, y=None, chunk: int = 64) -> torch.Tensor:
    """Per-level eps -> uint8 images [N, C, H, W] (CPU), ``chunk`` images at a time."""
    _check_chunk(chunk)
    device, dtype = _flow_device_dtype(flow)
    n = len(latents[0])
    y = _labels(y, n)
    out = []
    for s in range(0, n, chunk):
        eps = [e[s:s + chunk].to(device, dtype) for e in latents]
        cond = None if y is None else y[s:s + chunk].to(device)
        x, _ = flow(eps, cond=cond, reverse=True)
        out.append(postprocess(x, n_bits).cpu())
    return torch.cat(out)


def reconstruction_error(images_uint8: torch.Tensor, decoded_uint8: torch.Tensor, n_bits: int) -> torch.Tensor:
    """[N] largest |difference| per image in n-bit pixel levels (0 = the same image at the model's
    bit depth; 1 = some sub-pixel is one level off)."""
    diff = (reduce_bits(images_uint8, n_bits) - reduce_bits(decoded_uint8, n_bits)).abs()
    return diff.reshape(len(diff), -1).amax(dim=1)


def reconstruct(flow, images_uint8: torch.Tensor, n_bits: int, y=None, chunk: int = 64):
    """(latents, decoded uint8 images, [N] reconstruction error in n-bit levels)."""
    z = encode(flow, images_uint8, n_bits, y, chunk)
    back = decode(flow, z, n_bits, y, chunk)
    return z, back, reconstruction_error(images_uint8, back, n_bits)


# -- operations on latents ------------------------------------------------------------------------

def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per sample: the direction moves along the great circle from a/|a| to b/|b|, the norm linearly
    from |a| to |b|. a, b [N, ...]; t [T] -> [N, T, ...]."""
    fa, fb = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    na, nb = fa.norm(dim=1, keepdim=True), fb.norm(dim=1, keepdim=True)
    ua, ub = fa / na.clamp_min(1e-12), fb / nb.clamp_min(1e-12)
    omega = torch.acos((ua * ub).sum(1, keepdim=True).clamp(-1.0, 1.0))  # [N, 1]
    t = t.double()[None, :, None]  # [1, T, 1]
    so = torch.sin(omega)[:, None]  # [N, 1, 1]
    small = so.abs() < 1e-6  # (anti)parallel: no unique great circle; fall back to linear weights
    so = torch.where(small, torch.ones_like(so), so)
    wa = torch.where(small, 1 - t, torch.sin((1 - t) * omega[:, None]) / so)
    wb = torch.where(small, t, torch.sin(t * omega[:, None]) / so)
    u = wa * ua[:, None] + wb * ub[:, None]
    u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
    r = (1 - t) * na[:, None] + t * nb[:, None]
    return (u * r).reshape(len(a), t.shape[1], *a.shape[1:]).to(a.dtype)


def interpolate(latents: Latents, steps: int, mode: Literal["linear", "spherical"] = "linear",
                fix_coarse: int = 0) -> Latents:
    """Paths between consecutive anchors: latents of N >= 2 images -> latents of (N - 1) * ``steps``
    images, row r (images r*steps .. r*steps + steps - 1) going from anchor r (t = 0) to anchor r + 1
    (t = 1) in ``steps`` evenly spaced points, so both endpoints are the anchors themselves.

    ``mode``: ``linear`` (1 - t) a + t b, or ``spherical`` per level and per image (see :func:`_slerp`).
    ``fix_coarse``: the last ``fix_coarse`` levels (the coarsest) stay at anchor r's value along row r."""
    if mode not in ("linear", "spherical"):
        raise ValueError(f"mode must be 'linear' or 'spherical', got {mode!r}")
    n = len(latents[0])
    if n < 2:
        raise ValueError(f"interpolation needs at least 2 images, got {n}")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (both endpoints), got {steps}")
    if not 0 <= fix_coarse <= len(latents):
        raise ValueError(f"fix_coarse must be in 0..{len(latents)} (the number of levels), got {fix_coarse}")
    t = torch.linspace(0.0, 1.0, steps)
    out = []
    for level, e in enumerate(latents):
        a, b = e[:-1], e[1:]
        if level >= len(latents) - fix_coarse:
            path = a[:, None].expand(-1, steps, *a.shape[1:])
        elif mode == "linear":
            tt = t.to(e.dtype).view(1, steps, *[1] * (e.dim() - 1))
            path = (1 - tt) * a[:, None] + tt * b[:, None]
        else:
            path = _slerp(a, b, t)
        out.append(path.reshape(-1, *e.shape[1:]).contiguous())
    return out


@torch.no_grad()
def attribute_direction(flow, batches: Iterable[tuple], n_bits: int, per_level: bool = False, y=None,
                        chunk: int = 64) -> tuple[Latents, int, int]:
    """Glow's attribute direction from labelled images, streamed:

        d_l = mean(eps_l | attribute) - mean(eps_l | no attribute)

    for the top level only (the others zero) or, with ``per_level``, for every level.
    ``batches`` yields (uint8 images [b, C, H, W], bool [b] has-attribute) or, for a class-conditional
    model, (images, has, int64 labels [b]) so that each image is encoded under its own class (a
    batch's labels None: ``y`` for all). Returns (direction [1, C_l, H_l, W_l] per level, images
    with, images without)."""
    sums: list[list[torch.Tensor]] = [[], []]
    counts = [0, 0]
    for x, has, *labels in batches:
        has = torch.as_tensor(has, dtype=torch.bool)
        eps = encode(flow, x, n_bits, labels[0] if labels and labels[0] is not None else y, chunk)
        for k, mask in ((0, has), (1, ~has)):
            part = [e[mask].double().sum(0, keepdim=True) for e in eps]
            sums[k] = part if not sums[k] else [s + p for s, p in zip(sums[k], part)]
            counts[k] += int(mask.sum())
    if counts[0] == 0 or counts[1] == 0:
        raise ValueError(f"an attribute direction needs images with and without the attribute; got {counts[0]} "
                         f"with and {counts[1]} without")
    top = len(sums[0]) - 1
    direction = [(p / counts[0] - q / counts[1]).float() if per_level or level == top else torch.zeros_like(p).float()
                 for level, (p, q) in enumerate(zip(*sums))]
    return direction, counts[0], counts[1]


def manipulate(latents: Latents, direction: Latents, scales: list[float]) -> Latents:
    """eps + s * d for every image and scale: N images -> N * len(scales) latents, image-major
    (row i holds image i at every scale, in the order of ``scales``)."""
    s = torch.tensor(scales, dtype=torch.float32)
    out = []
    for e, d in zip(latents, direction):
        ss = s.view(1, -1, *[1] * (e.dim() - 1))
        out.append((e[:, None] + ss * d.to(e.dtype)[:, None]).reshape(-1, *e.shape[1:]))
    return out


@torch.no_grad()
def temperature_sweep(flow, shapes: list[tuple[int, int, int]], n_bits: int, temperatures: list[float], n: int = 8,
                      level: int | None = None, base_temperature: float = 1.0, y=None, seed: int = 0,
                      chunk: int = 64) -> torch.Tensor:
    """Samples from the same draws at each temperature: uint8 [len(temperatures) * n, C, H, W], one
    block of n per temperature. ``level=None`` scales every level's eps by T; ``level=l`` scales
    only level l (0 = finest, -1 = top) and keeps the others at ``base_temperature``, which shows
    what each scale of the model controls."""
    g = seeds.generator(seed, "sample")
    draws = [torch.randn((n, *s), generator=g) for s in shapes]
    if level is not None and not -len(shapes) <= level < len(shapes):
        raise ValueError(f"level must be in {-len(shapes)}..{len(shapes) - 1}, got {level}")
    lev = None if level is None else level % len(shapes)
    images = []
    for t in temperatures:
        eps = [d * (t if lev is None or l == lev else base_temperature) for l, d in enumerate(draws)]
        images.append(decode(flow, eps, n_bits, y, chunk))
    return torch.cat(images)


def mean_intensity(images_uint8: torch.Tensor) -> torch.Tensor:
    """[N] mean pixel value in [0, 255] (brightness)."""
    return images_uint8.float().reshape(len(images_uint8), -1).mean(1)


def finite_or_raise(latents: Latents, what: str) -> Latents:
    """Latents that are all finite, or a ValueError naming ``what`` (a diverged model encodes to inf/NaN)."""
    for level, e in enumerate(latents):
        if not torch.isfinite(e).all():
            raise FloatingPointError(f"{what}: level {level} of the latents is not finite (inf/NaN): the model "
                                     f"diverged or the dtype overflowed; try fp32")
    return latents


__all__ = ["Latents", "encode", "decode", "reconstruction_error", "reconstruct", "interpolate", "attribute_direction",
           "manipulate", "temperature_sweep", "mean_intensity", "finite_or_raise"]
