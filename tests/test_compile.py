"""engine.compile: torch.compile of the coupling networks keeps parameter names, and inverse
recompute through compiled networks gives plain autograd's gradients. Compiled with the
aot_eager backend (dynamo + AOTAutograd, the parts that meet the recompute's autograd calls)
so the test needs no C++ toolchain and little time; the default backend is inductor."""

import copy

import pytest
import torch

from flowscale.config import ConfigError, load_config
from flowscale.flows.nets import GlowNet, compile_networks
from flowscale.inverse_checkpoint import inverse_checkpoint
from flowscale.loss import flow_bpd_dequantized

from helpers import small_flow


def _grads(flow, x):
    flow.zero_grad(set_to_none=True)
    flow_bpd_dequantized(flow, x, 8)[0].sum().backward()
    return {n: p.grad.clone() for n, p in flow.named_parameters() if p.grad is not None}


def test_compiled_networks_with_inverse_recompute_match_plain_autograd():
    torch._dynamo.reset()
    plain = small_flow("glow", levels=2, steps=2, width=8, dtype=torch.float32)
    keys = list(plain.state_dict())
    flow = inverse_checkpoint(copy.deepcopy(plain))
    assert compile_networks(flow, backend="aot_eager") == 5  # 2 levels x 2 couplings, 1 split prior
    assert list(flow.state_dict()) == keys  # in place: no _orig_mod prefixes
    assert all(n._compiled_call_impl is not None for n in flow.modules() if isinstance(n, GlowNet))
    x = torch.rand(4, 3, 8, 8) - 0.5
    g_plain, g_comp = _grads(plain, x), _grads(flow, x)
    assert g_plain.keys() == g_comp.keys()
    for k in g_plain:
        rel = ((g_plain[k] - g_comp[k]).norm() / g_plain[k].norm().clamp_min(1e-30)).item()
        assert rel < 1e-4, (k, rel)


def test_compile_is_refused_with_zero3():
    with pytest.raises(ConfigError, match="engine.compile"):
        load_config(None, ["engine.compile=true", "engine.zero_stage=3", "optim.ema_decay=0"])
