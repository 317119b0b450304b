"""Model states per GPU: what scales with the parameter count, as DeepSpeed 0.19 holds it."""

from __future__ import annotations


_OPT_MOMENTS = {"adam": 2, "adamw": 2, "adamax": 2}  # exp_avg + exp_avg_sq / exp_inf, fp32


def model_state_bytes(n_params: int, precision: str, zero_stage: int, gpus: int, optimizer: str = "adam",
                      ema: bool = False, zero: dict | None = None) -> dict[str, int]:
    """Per-GPU bytes of everything that scales with the parameter count (and DeepSpeed's reduce
    bucket) at the backward peak, as DeepSpeed 0.19 holds it under flowscale's engine config (a
    torch optimizer, no ``grad_accum_dtype``: gradients are reduced in the training dtype).
    ``zero``: the ``zero_optimization`` section that :func:`flowscale.engine.zero_optimization`
    generates (None = its defaults for ``zero_stage``): bucket sizes, overlap, contiguous gradients.
    Measured against a real engine in tests/test_plan_states.py.

    P parameters, N = gpus, w = 4 (fp32) or 2 (bf16/fp16) bytes, B = reduce_bucket_size (5e8):

        stage  parameters        gradients  fp32 master   moments  buckets
        0      wP                -          4P if bf16    8P       -
        1      wP                wP/N (b)   4P/N          8P/N     wB (a)
        2      wP                wP/N (b)   4P/N          8P/N     wB (a)
        3      wP/N + live (c)   wP/N       4P/N          8P/N     wB

    Parameters, fp32 master weights, moments and EMA live from start to end; so do ZeRO-3's
    gradient partition and reduce bucket (one flat buffer each, allocated at initialisation).

    (a) ZeRO-1/2 allocate their bucket at the first gradient of every backward and free it when
        backward ends: alive through all of backward, so at the peak (on CPU ``torch.empty`` of
        2 GB fp32 is paged in lazily; a GPU's caching allocator holds all of it).
    (b) The reduced gradient partition appears at the end of backward (next to the bucket it is
        flushed from) and is freed by the step, which first turns it into fp32 (4P/N, after the
        bucket is gone). ZeRO-2 keeps param.grad as views into the bucket.
    (c) ZeRO-3 keeps parameters of at most stage3_param_persistence_threshold (1e5) elements
        whole on every rank and gathers the others module by module, prefetching up to
        stage3_prefetch_bucket_size (5e7) elements: counted as w * min(P, prefetch) when N > 1
        (at N = 1 the partition is the parameter; nothing is gathered).
    (d) ZeRO-1/2 with overlap_comm and contiguous_gradients double-buffer the bucket (one fills
        while the other is reduced): 2wB. Without contiguous_gradients there is no bucket, and
        the gradients stay on param.grad (wP) through backward.

    At ZeRO-0/1 the wP of param.grad exists only from backward to the end of the step; the
    plan counts it with the activations (:class:`flowscale.tools.plan.ModePlan`), level by level as
    backward makes it. bf16 (and fp16) ZeRO-0 wraps the torch optimizer in DeepSpeed's
    FP16_UnfusedOptimizer: a whole fp32 copy of the parameters on every rank (not partitioned),
    the moments on that copy, and fp32 gradients only inside the step. fp32 ZeRO-0 steps the
    torch optimizer on the parameters: moments 8P, no copy. The EMA shadow is a whole fp32 copy
    on every rank.
    """
    if zero is None:
        from ...config import EngineConfig
        from ...engine import zero_optimization

        zero = zero_optimization(EngineConfig(zero_stage=zero_stage))  # every setting at its default
    P, N = n_params, gpus
    w = 4 if precision == "fp32" else 2
    moments = _OPT_MOMENTS[optimizer] * 4
    low = precision != "fp32"
    s: dict[str, int] = {}
    if zero_stage == 0:
        s["parameters"] = w * P
        s["gradients"] = 0  # param.grad lives only from backward to the end of the step (counted in ModePlan)
        s["fp32 master weights"] = 4 * P if low else 0
        s["optimizer moments"] = moments * P
    elif zero_stage in (1, 2):
        s["parameters"] = w * P
        s["gradients"] = w * P // N
        s["fp32 master weights"] = 4 * P // N
        s["optimizer moments"] = moments * P // N
        if zero["contiguous_gradients"]:
            s["gradient buckets"] = w * zero["reduce_bucket_size"] * (2 if zero["overlap_comm"] else 1)
        else:
            s["gradients"] += w * P  # no bucket: param.grad holds every gradient until reduced
    else:
        s["parameters"] = w * P // N
        s["gathered parameters"] = w * min(P, zero["stage3_prefetch_bucket_size"]) if N > 1 else 0
        s["gradients"] = w * P // N
        s["fp32 master weights"] = 4 * P // N
        s["optimizer moments"] = moments * P // N
        s["gradient buckets"] = w * zero["reduce_bucket_size"]
    s["EMA weights"] = 4 * P if ema else 0
    return {k: int(v) for k, v in s.items()}
