"""memory="checkpoint" replays the unroll one step at a time: its gradients must equal full mode's."""

import pytest
import torch
import torch.nn.functional as F

from conftest import unroll_problem
from mttlss.augment import DSAConfig
from mttlss.distributed import reduce_partial_grads
from mttlss.matching import BF16Products, InnerSteps, batch_schedule, trajectory_loss, unroll_student
from mttlss.models import ParamLayout, build_model, flatten_params, model_spec
from mttlss.parameterization import LowRankSet, VectorSet
from mttlss.training import soft_label_loss


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_forward_loss(a: torch.Tensor, b: torch.Tensor) -> None:
    """Full mode's inner gradients are built with create_graph=True, which takes autograd's twice-differentiable
    formulas (group norm's composite backward); the checkpointed forward takes the once-differentiable kernels.
    The two agree to float64 rounding, not bit for bit."""
    torch.testing.assert_close(a, b, rtol=1e-13, atol=0.0)


def _lowrank_problem(dtype):
    """A tiny ConvNet, a low-rank set with random pairing (randomness inside decode), soft labels, DSA."""
    return unroll_problem(LowRankSet(num_classes=3, image_shape=(3, 16, 16), images_per_class=4, rank=3, subspaces="shared",
                                 num_subspaces=2, pairing="random"), dtype)


def _vector_problem(dtype):
    """The same with a form B set: half-resolution mappers, per-subspace means, random pairing."""
    return unroll_problem(VectorSet(num_classes=3, image_shape=(3, 16, 16), images_per_class=4, rank=3,
                                    subspaces="shared", num_subspaces=2, pairing="random", subspace_mean=True,
                                    mapper_downsample=2), dtype)


PROBLEMS = {"lowrank": _lowrank_problem, "vector": _vector_problem}


def _loss_and_grads(memory, dtype=torch.float64, dsa_config=DSAConfig(), problem=_lowrank_problem, syn_steps=6):
    """memory: a mode of unroll_student, or "stop_gradient": the reference for tesla, written out here as
    theta_{n+1} = theta_n - alpha g_n(sg(theta_n)) with autograd's own backward (each step sees theta_n's value,
    no gradient flows through the argument of g_n)."""
    model, syn, label_logits, start, target = problem(dtype)
    syn_lr = torch.tensor(0.05, dtype=dtype, requires_grad=True)
    gen = torch.Generator().manual_seed(11)
    batches = batch_schedule(syn.num_images, 5, syn_steps, gen)
    learnables = (*syn.parameters(), label_logits)
    decode = lambda idx: syn.decode(idx, generator=gen)  # noqa: E731
    label_loss = lambda z, idx: soft_label_loss(z, label_logits[idx])  # noqa: E731
    if memory == "stop_gradient":
        steps = InnerSteps(model=model, layout=ParamLayout.of(model), decode=decode, label_loss=label_loss,
                           batches=batches, dsa_config=dsa_config, generator=gen)
        theta = start.clone()
        for n in range(syn_steps):
            theta = theta - syn_lr * steps.gradient(theta.detach().requires_grad_(True), n, create_graph=True)
    else:
        theta = unroll_student(model, ParamLayout.of(model), start, decode=decode, label_loss=label_loss,
                               syn_lr=syn_lr, batches=batches, dsa_config=dsa_config, generator=gen, memory=memory,
                               learnables=learnables)
    loss = trajectory_loss(theta, start, target)
    grads = torch.autograd.grad(loss, (*learnables, syn_lr))
    return loss.detach(), grads, gen.get_state()


@pytest.mark.parametrize("kind", PROBLEMS)
def test_checkpoint_mode_gradients_equal_full_mode_in_float64(kind):
    problem = PROBLEMS[kind]
    loss_full, grads_full, state_full = _loss_and_grads("full", problem=problem)
    loss_ckpt, grads_ckpt, state_ckpt = _loss_and_grads("checkpoint", problem=problem)
    _same_forward_loss(loss_full, loss_ckpt)
    # factors (lowrank: U, V, codes; vector: mappers, codes, means), labels, alpha
    assert len(grads_full) == {"lowrank": 3, "vector": 3}[kind] + 2
    assert len(grads_full) == len(list(problem(torch.float64)[1].parameters())) + 2
    for g_full, g_ckpt in zip(grads_full, grads_ckpt):
        assert g_full.abs().sum() > 0  # every learnable really gets a gradient
        assert _relative_error(g_ckpt, g_full) <= 1e-8
    # the replay restores the generator: the caller's next draws are the same in both modes
    assert torch.equal(state_full, state_ckpt)


@pytest.mark.parametrize("kind", PROBLEMS)
def test_tesla_mode_is_the_stop_gradient_unroll_and_not_the_exact_gradient(kind):
    """memory="tesla" differentiates theta_N = theta_0 - alpha sum_n g_n(theta_n) with every theta_n held fixed:
    the same loss as the exact modes, the gradients of the stop-gradient unroll (float64, <= 1e-8), and for
    6 inner steps measurably not MTT's."""
    problem = PROBLEMS[kind]
    loss_full, grads_full, state_full = _loss_and_grads("full", problem=problem)
    loss_tesla, grads_tesla, state_tesla = _loss_and_grads("tesla", problem=problem)
    loss_ref, grads_ref, _ = _loss_and_grads("stop_gradient", problem=problem)
    _same_forward_loss(loss_tesla, loss_full)  # the forward is the exact unroll
    assert torch.equal(state_tesla, state_full)
    for g_tesla, g_ref in zip(grads_tesla, grads_ref, strict=True):
        assert g_ref.abs().sum() > 0
        assert _relative_error(g_tesla, g_ref) <= 1e-8
    assert max(_relative_error(g_t, g_f) for g_t, g_f in zip(grads_tesla, grads_full)) > 1e-3


def test_tesla_mode_is_exact_for_one_inner_step():
    """With syn_steps 1 no later step depends on the batch: TESLA's rewrite drops nothing."""
    _, grads_full, _ = _loss_and_grads("full", syn_steps=1)
    _, grads_tesla, _ = _loss_and_grads("tesla", syn_steps=1)
    for g_tesla, g_full in zip(grads_tesla, grads_full, strict=True):
        assert _relative_error(g_tesla, g_full) <= 1e-10


def test_checkpoint_mode_without_augmentation_or_learnables_still_trains_alpha():
    model, syn, _, start, target = _lowrank_problem(torch.float64)
    x = syn.decode().detach()
    y = syn.labels_hard()
    batches = batch_schedule(len(x), 4, 3, torch.Generator().manual_seed(0))
    grads = []
    for memory in ("full", "checkpoint"):
        syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        theta = unroll_student(model, ParamLayout.of(model), start, decode=lambda idx: x[idx],
                               label_loss=lambda z, idx: F.cross_entropy(z, y[idx]), syn_lr=syn_lr, batches=batches,
                               dsa_config=None, generator=None, memory=memory)
        trajectory_loss(theta, start, target).backward()
        grads.append(syn_lr.grad)
    assert grads[0] != 0
    assert abs(float(grads[1] - grads[0])) <= 1e-8 * abs(float(grads[0]))


def test_checkpoint_mode_matches_full_mode_on_the_real_size_convnet_in_float32():
    """ConvNet-3 width 128 on CIFAR-10 shapes, hard labels, DSA: one outer iteration's pixel gradient."""
    torch.manual_seed(0)
    model = build_model(model_spec("convnet", width=128, depth=3), channels=3, num_classes=10, image_size=(32, 32))
    layout = ParamLayout.of(model)
    start = flatten_params(model)
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(20) % 10
    results = []
    for memory in ("full", "checkpoint"):
        x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)  # training space
        syn_lr = torch.tensor(0.01, requires_grad=True)
        gen = torch.Generator().manual_seed(5)
        batches = batch_schedule(20, 10, 4, gen)
        theta = unroll_student(model, layout, start, decode=lambda idx: x[idx],
                               label_loss=lambda z, idx: F.cross_entropy(z, y[idx]), syn_lr=syn_lr, batches=batches,
                               dsa_config=DSAConfig(), generator=gen, memory=memory, learnables=(x,))
        trajectory_loss(theta, start, target).backward()
        results.append((x.grad, syn_lr.grad))
    (gx_full, ga_full), (gx_ckpt, ga_ckpt) = results
    assert _relative_error(gx_ckpt, gx_full) <= 1e-4
    assert abs(float(ga_ckpt - ga_full)) <= 1e-4 * abs(float(ga_full))


def test_bf16_products_round_only_the_convolutions_and_linear_layers():
    """Convolutions and linear layers see bfloat16 operands and hand back float32; everything else stays float32."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    conv, norm, fc = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(4, 4), torch.nn.Linear(4 * 64, 5)
    with BF16Products():
        h = conv(x)
        n = norm(h)
        z = fc(torch.relu(n).flatten(1))
    bf = lambda t: t.detach().to(torch.bfloat16)  # noqa: E731
    assert h.dtype == n.dtype == z.dtype == torch.float32
    assert torch.equal(h, F.conv2d(bf(x), bf(conv.weight), bf(conv.bias), padding=1).float())
    assert torch.equal(n, F.group_norm(h, 4, norm.weight, norm.bias))  # the norm itself in float32
    assert torch.equal(z, F.linear(bf(torch.relu(n).flatten(1)), bf(fc.weight), bf(fc.bias)).float())
    assert not torch.equal(h, conv(x))  # bf16 rounding did happen
    with BF16Products():  # operands passed by keyword are rounded alike
        assert torch.equal(F.conv2d(input=x, weight=conv.weight, bias=conv.bias, padding=1), h)
    z.sum().backward()
    assert x.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("memory", ["full", "checkpoint"])
def test_bf16_unroll_gradients_point_where_fp32_does(memory):
    """precision=bf16 changes the rounding of the products only: the outer gradient stays close to fp32's."""
    grads = {}
    for precision in ("fp32", "bf16"):
        model, syn, label_logits, start, target = _lowrank_problem(torch.float32)
        syn_lr = torch.tensor(0.05, requires_grad=True)
        gen = torch.Generator().manual_seed(11)
        learnables = (*syn.parameters(), label_logits)
        theta = unroll_student(model, ParamLayout.of(model), start, decode=lambda idx: syn.decode(idx, generator=gen),
                               label_loss=lambda z, idx: soft_label_loss(z, label_logits[idx]), syn_lr=syn_lr,
                               batches=batch_schedule(syn.num_images, 5, 6, gen), dsa_config=DSAConfig(), generator=gen,
                               memory=memory, learnables=learnables, precision=precision)
        grads[precision] = torch.autograd.grad(trajectory_loss(theta, start, target), (*learnables, syn_lr))
    for g32, g16 in zip(grads["fp32"], grads["bf16"], strict=True):
        assert g16.dtype == torch.float32
        if g32.numel() > 1:
            assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
        assert 0 < _relative_error(g16, g32) < 0.2  # rounded, and not far


def test_unknown_memory_mode_or_precision_names_the_choices():
    model, syn, _, start, _ = _lowrank_problem(torch.float64)
    kwargs = dict(decode=lambda idx: syn.decode(idx), label_loss=lambda z, idx: z.sum(), syn_lr=torch.tensor(0.1),
                  batches=[torch.arange(2)], dsa_config=None, generator=None)
    with pytest.raises(ValueError, match="checkpoint"):
        unroll_student(model, ParamLayout.of(model), start, memory="tesla-ish", **kwargs)
    with pytest.raises(ValueError, match="bf16"):
        unroll_student(model, ParamLayout.of(model), start, precision="fp8", **kwargs)


def _rank_worker(rank: int, world_size: int, store: str, out: str, memory: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model, syn, label_logits, start, target = _lowrank_problem(torch.float64)
        syn_lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
        gen = torch.Generator().manual_seed(11)
        batches = batch_schedule(syn.num_images, 5, 6, gen)
        learnables = (*syn.parameters(), label_logits)
        theta = unroll_student(model, ParamLayout.of(model), start, decode=lambda idx: syn.decode(idx, generator=gen),
                               label_loss=lambda z, idx: soft_label_loss(z, label_logits[idx]), syn_lr=syn_lr,
                               batches=batches, dsa_config=DSAConfig(), generator=gen, memory=memory,
                               learnables=learnables)
        loss = trajectory_loss(theta, start, target)
        loss.backward()
        reduce_partial_grads(list(learnables))
        torch.save({"loss": loss.detach(), "grads": [t.grad for t in (*learnables, syn_lr)]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("memory", ["full", "checkpoint", "tesla"])
def test_two_gloo_ranks_give_the_single_process_loss_and_gradients(tmp_path, memory):
    loss_one, grads_one, _ = _loss_and_grads(memory)
    out = str(tmp_path / "ranks")
    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / "store"), out, memory), nprocs=2)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert abs(float(got["loss"] - loss_one)) <= 1e-12
        for g_rank, g_one in zip(got["grads"], grads_one):
            assert _relative_error(g_rank, g_one) <= 1e-10
