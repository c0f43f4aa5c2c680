import copy

import pytest
import torch
import torch.nn.functional as F

from mttlss.matching import batch_schedule, sample_start_epoch, start_epoch_upper, trajectory_loss, unroll_student
from mttlss.models import ParamLayout, build_model, flatten_params, model_spec
from mttlss.parameterization import LowRankSet
from mttlss.training import soft_label_loss


def tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return build_model(model_spec("convnet", width=6, depth=1), channels=1, num_classes=3, image_size=(8, 8)).to(dtype)


def test_functional_unroll_matches_module_sgd_step_by_step():
    model = tiny_model()
    layout = ParamLayout.of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1, 8, 8, generator=gen)
    y = torch.tensor([0, 1, 2] * 3)
    batches = batch_schedule(9, 4, 5, gen)
    lr = 0.05
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    start = flatten_params(model)
    for k, idx in enumerate(batches, start=1):
        opt.zero_grad()
        F.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
        theta = unroll_student(model, layout, start, decode=lambda i: x[i], label_loss=lambda z, i: F.cross_entropy(z, y[i]),
                               syn_lr=torch.tensor(lr), batches=batches[:k], dsa_config=None, generator=None)
        assert torch.allclose(theta, flatten_params(ref), atol=1e-5, rtol=1e-4), f"step {k} differs"
    assert not torch.allclose(theta, start)  # the student really moved


def _matching_loss(model, layout, start, target, decode, y_logits, batches, lr):
    theta = unroll_student(model, layout, start, decode=decode,
                           label_loss=lambda z, i: soft_label_loss(z, y_logits[i]), syn_lr=lr,
                           batches=batches, dsa_config=None, generator=None)
    return trajectory_loss(theta, start, target)


def test_gradient_matches_finite_differences_pixels_labels_and_lr():
    model = tiny_model(torch.float64)
    layout = ParamLayout.of(model)
    gen = torch.Generator().manual_seed(1)
    start = flatten_params(model)
    target = start + 0.05 * torch.randn(start.shape, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    y_logits = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    batches = batch_schedule(6, 3, 4, gen)

    loss = _matching_loss(model, layout, start, target, lambda i: x[i], y_logits, batches, lr)
    gx, gy, glr = torch.autograd.grad(loss, (x, y_logits, lr))
    eps = 1e-6
    for tensor, grad in ((x, gx), (y_logits, gy), (lr, glr)):
        d = torch.randn(tensor.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            plus = tensor + eps * d
            minus = tensor - eps * d
        def loss_with(value):
            xx = value if tensor is x else x.detach()
            yy = value if tensor is y_logits else y_logits.detach()
            ll = value if tensor is lr else lr.detach()
            return _matching_loss(model, layout, start, target, lambda i: xx[i], yy, batches, ll).item()

        fd = (loss_with(plus) - loss_with(minus)) / (2 * eps)
        analytic = (grad * d).sum().item()
        assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(fd)), (fd, analytic)
        assert abs(analytic) > 1e-8  # the check is not vacuous


def test_gradient_reaches_lowrank_factors_and_matches_finite_differences():
    model = tiny_model(torch.float64)
    layout = ParamLayout.of(model)
    gen = torch.Generator().manual_seed(2)
    syn = LowRankSet(num_classes=3, image_shape=(1, 8, 8), images_per_class=2, rank=2).double()
    with torch.no_grad():
        for p in syn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    start = flatten_params(model)
    target = start + 0.05 * torch.randn(start.shape, generator=gen, dtype=torch.float64)
    y_logits = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    batches = batch_schedule(6, 3, 3, gen)
    lr = torch.tensor(0.1, dtype=torch.float64)
    loss = _matching_loss(model, layout, start, target, lambda i: syn.decode(i), y_logits, batches, lr)
    params = list(syn.parameters())
    grads = torch.autograd.grad(loss, params)
    assert all(g.abs().sum() > 0 for g in grads)
    directions = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    eps = 1e-6

    def shifted(sign):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(sign * eps * d)
        value = _matching_loss(model, layout, start, target, lambda i: syn.decode(i), y_logits, batches, lr).item()
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.sub_(sign * eps * d)
        return value

    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = sum((g * d).sum() for g, d in zip(grads, directions)).item()
    assert abs(fd - analytic) <= 1e-5 * max(1.0, abs(fd)), (fd, analytic)


def test_start_epoch_window_grows_progressively_and_stays_fixed_otherwise():
    kw = dict(min_start_epoch=0, current_max_start_epoch=10, max_start_epoch=20, expansion_end_epoch=1000)
    assert start_epoch_upper(0, progressive=True, **kw) == 10
    assert start_epoch_upper(500, progressive=True, **kw) == 15
    assert start_epoch_upper(1000, progressive=True, **kw) == 20
    assert start_epoch_upper(5000, progressive=True, **kw) == 20
    assert start_epoch_upper(0, progressive=False, **kw) == 20
    with pytest.raises(ValueError, match="empty start-epoch window"):
        start_epoch_upper(0, min_start_epoch=5, current_max_start_epoch=5, max_start_epoch=5, expansion_end_epoch=10,
                          progressive=False)
    gen = torch.Generator().manual_seed(0)
    draws = {sample_start_epoch(4, min_start_epoch=2, generator=gen) for _ in range(200)}
    assert draws == {2, 3}


def test_trajectory_loss_is_normalised():
    start, target = torch.zeros(5), torch.ones(5)
    assert trajectory_loss(start.clone(), start, target).item() == pytest.approx(1.0)
    assert trajectory_loss(target.clone(), start, target).item() == pytest.approx(0.0)
    assert trajectory_loss(0.5 * target, start, target).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="zero or non-finite length"):
        trajectory_loss(start, start, start)


def test_batch_schedule_samples_without_replacement_within_a_pass():
    gen = torch.Generator().manual_seed(0)
    batches = batch_schedule(10, 5, 4, gen)
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    assert sorted(torch.cat(batches[:2]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[2:]).tolist()) == list(range(10))


def test_layout_rejects_wrong_sized_vectors():
    layout = ParamLayout.of(tiny_model())
    with pytest.raises(ValueError, match="another architecture"):
        layout.unflatten(torch.zeros(layout.num_params + 1))
