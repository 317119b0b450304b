"""Coupling networks: GlowNet's hidden ActNorms run fused (one multiply-add) or folded into the
convolutions compute the same function and gradients as the module-by-module path, save the same
activations when fused, and the data-dependent init still reaches them."""

import pytest
import torch

from flowscale.flows.actnorm import ActNorm, initialize_actnorm
from flowscale.flows.base import watch
from flowscale.inverse_checkpoint import saved_activation_bytes
from flowscale.flows.nets import GlowNet, fold_norms


def _net(seed=0):
    torch.manual_seed(seed)
    net = GlowNet(6, 12, width=16).double()
    with torch.no_grad():  # non-trivial ActNorms and output conv (it starts at zero)
        for m in net.modules():
            if isinstance(m, ActNorm):
                m.bias.normal_()
                m.logs.normal_(std=0.5)
        net.out.conv.weight.normal_(std=0.1)
        net.out.logs.normal_(std=0.1)
    return net


def _unfolded(net, x):
    """The module-by-module path, forced by a hook that watches the ActNorm calls."""
    h = watch(net.norm1, lambda m, a: None)
    try:
        return net(x)
    finally:
        h.remove()


@pytest.mark.parametrize("fold", [False, True], ids=["fused", "folded"])
def test_actnorm_paths_equal_module_path_with_gradients(fold):
    net = fold_norms(_net(), fold)
    assert net._norm_path() == ("folded" if fold else "fused")
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 12, 5, 5, dtype=torch.float64)
    grads = []
    for run in (net, lambda x: _unfolded(net, x)):
        net.zero_grad(set_to_none=True)
        x.grad = None
        out = run(x)
        out.backward(g)
        grads.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in net.parameters()]))
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx2, rtol=1e-12, atol=1e-12)
    for a, b in zip(gp1, gp2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_actnorm_init_reaches_the_networks_actnorms():
    torch.manual_seed(1)
    net = GlowNet(6, 12, width=16).double()
    x = torch.randn(64, 6, 4, 4, dtype=torch.float64) * 3 + 1
    assert initialize_actnorm(net, x) == 2  # the hooks make the net call its ActNorms
    h = net.conv1(x)
    z, _ = net.norm1(h)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-8 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05
    assert net._norm_path() == "fused"  # the init's hooks are gone


def test_fused_path_saves_what_the_module_path_saves():
    net = _net()
    x = torch.randn(3, 6, 16, 16, dtype=torch.float64, requires_grad=True)
    params = list(net.parameters())
    fused, _ = saved_activation_bytes(lambda: net(x), exclude=params)
    modules, _ = saved_activation_bytes(lambda: _unfolded(net, x), exclude=params)
    folded, _ = saved_activation_bytes(lambda: fold_norms(net)(x), exclude=params)
    hidden = 3 * 16 * 16 * 16 * 8  # one [3, 16, 16, 16] float64 hidden activation
    # fused: the same two per ActNorm; folded: one per ActNorm (plus the small folded weights)
    assert abs(fused - modules) < hidden / 10 and folded < modules - 1.5 * hidden


def test_spectral_norm_net_runs_its_modules():
    assert fold_norms(GlowNet(6, 12, width=16, spectral_norm=True))._norm_path() == "modules"
