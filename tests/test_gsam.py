"""GSAM (mttlss.gsam): one step on a tiny float64 least-squares problem against the paper's formulas by hand."""

import copy

import pytest
import torch
from torch import nn

from mttlss.gsam import GSAM
from mttlss.training import train_one_epoch

X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0], [2.0, 1.0]], dtype=torch.float64)  # [N=4, 2]
Y = torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=torch.float64)  # [N]
THETA = torch.tensor([0.4, -0.7, 0.2], dtype=torch.float64)  # [w1, w2, b]: two tensors, one vector for GSAM


def _linear() -> nn.Linear:
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(THETA[:2].reshape(1, 2))
        model.bias.copy_(THETA[2:])
    return model


def _loss(model: nn.Module) -> torch.Tensor:
    return ((model(X).squeeze(1) - Y) ** 2).mean()


def _grad(theta: torch.Tensor) -> torch.Tensor:
    """d/dtheta mean((X w + b - y)^2) = (2/N) [X, 1]^T r, in closed form (no autograd)."""
    xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)  # [N, 3]
    return 2.0 / len(X) * xa.T @ (xa @ theta - Y)


def _by_hand(*, rho: float, alpha: float, lr: float, weight_decay: float = 0.0) -> torch.Tensor:
    g = _grad(THETA)
    g_p = _grad(THETA + rho * g / g.norm())
    g_perp = g - (g @ g_p) / (g_p @ g_p) * g_p
    d = g_p - alpha * g_perp
    return THETA - lr * (d + weight_decay * THETA)  # SGD's first step: the momentum buffer starts as the gradient


def _one_step(model: nn.Module, opt) -> torch.Tensor:
    if isinstance(opt, GSAM):
        opt.step(lambda: _loss(model))
    else:
        opt.zero_grad()
        _loss(model).backward()
        opt.step()
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


def _gsam(model, *, rho, alpha, lr=0.1, momentum=0.0, weight_decay=0.0):
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return GSAM(base=sgd, rho=rho, alpha=alpha)


@pytest.mark.parametrize("rho, alpha, momentum, weight_decay", [(0.05, 0.3, 0.0, 0.0), (0.5, 1.0, 0.9, 0.01)])
def test_one_step_matches_the_formulas(rho, alpha, momentum, weight_decay):
    model = _linear()
    got = _one_step(model, _gsam(model, rho=rho, alpha=alpha, momentum=momentum, weight_decay=weight_decay))
    want = _by_hand(rho=rho, alpha=alpha, lr=0.1, weight_decay=weight_decay)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), (got, want)
    # the perturbation is large enough here that GSAM is not just SGD
    assert not torch.allclose(got, _by_hand(rho=0.0, alpha=0.0, lr=0.1, weight_decay=weight_decay), atol=1e-4)


def test_alpha_zero_is_sam():
    model = _linear()
    got = _one_step(model, _gsam(model, rho=0.5, alpha=0.0))
    g = _grad(THETA)
    assert torch.allclose(got, THETA - 0.1 * _grad(THETA + 0.5 * g / g.norm()), rtol=0, atol=1e-12)


def test_rho_zero_alpha_zero_is_a_plain_sgd_step():
    a, b = _linear(), _linear()
    got = _one_step(a, _gsam(a, rho=0.0, alpha=0.0, momentum=0.9, weight_decay=0.01))
    plain = _one_step(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01))
    assert torch.equal(got, plain)


def test_small_rho_approaches_sgd_whatever_alpha():
    a, b = _linear(), _linear()
    got = _one_step(a, _gsam(a, rho=1e-7, alpha=1.0))
    plain = _one_step(b, torch.optim.SGD(b.parameters(), lr=0.1))
    assert torch.allclose(got, plain, rtol=0, atol=1e-6) and not torch.equal(got, plain)


def test_weights_restored_before_the_base_step_and_loss_is_at_w():
    model = _linear()
    opt = _gsam(model, rho=0.5, alpha=0.3, lr=0.0)  # lr 0: the step leaves w exactly where it was
    with torch.no_grad():
        before = _loss(model)
    assert torch.equal(opt.step(lambda: _loss(model)), before)
    assert torch.equal(torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]), THETA)


def test_zero_gradient_is_no_step():
    model = _linear()
    opt = _gsam(model, rho=0.05, alpha=0.3)
    opt.step(lambda: 0.0 * _loss(model))
    assert torch.equal(torch.cat([model.weight.detach().reshape(-1), model.bias.detach()]), THETA)


def test_batchnorm_statistics_come_from_the_pass_at_w_only():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).double()
    twin = copy.deepcopy(net)
    x = X.clone()

    def loss_of(m):
        return lambda: (m(x).squeeze(1) - Y).pow(2).mean()

    GSAM(base=torch.optim.SGD(net.parameters(), lr=0.1), rho=0.5, alpha=0.3, buffers=net.buffers()).step(loss_of(net))
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    loss_of(twin)().backward()
    sgd.step()
    for got, want in zip(net.buffers(), twin.buffers()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kw, match", [(dict(rho=-0.1, alpha=0.3), "rho"), (dict(rho=0.01, alpha=float("nan")), "alpha")])
def test_bad_settings_name_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        GSAM(base=torch.optim.SGD(_linear().parameters(), lr=0.1), **kw)


def test_train_one_epoch_takes_gsam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(32, 1, 2, 2), torch.randint(0, 3, (32,))
    opt = GSAM(base=torch.optim.SGD(model.parameters(), lr=0.5), rho=0.05, alpha=0.3)
    losses = [train_one_epoch(model, opt, x=x, targets=y, batch_size=8, dsa_config=None,
                              generator=torch.Generator().manual_seed(0)) for _ in range(5)]
    assert losses[-1] < losses[0]
