"""Trajectory matching: the student unroll, the normalised parameter distance, the start-epoch window.

One outer iteration of MTT (method.md section 3):

    theta_0 = theta*_t                                    (expert checkpoint t)
    theta_{n+1} = theta_n - alpha * grad l(f(A_n(x_Bn); theta_n), y_Bn)     n = 0 .. N-1  (N = syn_steps)
    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2       (M = expert_epochs)

Parameters travel as one flat vector [P] (the layout of ``model.named_parameters()``), which is also how
expert trajectories are stored, and are cut into named views for ``torch.func.functional_call``. L
backpropagates through the whole unroll into the synthetic factors, the labels and alpha (second order,
exact), in one of two ways that give the same gradients:

- ``memory="full"`` (MTT's way): the inner gradients are built with ``create_graph=True`` and every step's
  graph lives until the outer backward, so memory grows with syn_steps x batch_syn.
- ``memory="checkpoint"``: the forward keeps theta_n [P] and the generator state of each step only; the
  backward replays the steps last to first, one graph alive at a time (``_CheckpointedUnroll``).

``memory="tesla"`` is not exact: it replays the steps as checkpoint mode does but keeps the adjoint at
dL/dtheta_N, i.e. it drops the path by which step n's batch moves theta_{n+1..N-1} and so the later inner
gradients (the -alpha H_m a terms). That is TESLA's constant-memory rewrite (Cui et al., 2023), which
differentiates theta_N = theta_0 - alpha sum_n g_n(theta_n) with every theta_n held fixed (the paper calls
its procedure exact; its derivation drops dg_m/dx_n for m > n); it saves the Hessian-vector product of each
step. Its gradient is MTT's for syn_steps 1 and an approximation beyond.

Under torchrun each rank runs the network on its slice of every synthetic batch and the inner gradient is
summed over ranks (``mttlss.distributed``); with one process those sums are the identity.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from mttlss.augment import DSAConfig, dsa
from mttlss.distributed import all_reduce_sum, local_positions, replicated, sum_of_partials
from mttlss.models import ParamLayout

# ---------------------------------------------------------------------------------------------------------
# start-epoch window (method.md section 7)


def start_epoch_upper(
    iteration: int,
    *,
    min_start_epoch: int,
    current_max_start_epoch: int,
    max_start_epoch: int,
    expansion_end_epoch: int,
    progressive: bool,
) -> int:
    """U(i): the exclusive upper bound of the start epoch at outer iteration i.

    Progressive ("sequential generation"): U grows linearly from T_cur to T+ over E_exp iterations, so the
    synthetic set first matches easy early segments. Plain MTT: U = T+.
    """
    if progressive:
        grow = (max_start_epoch - current_max_start_epoch) * iteration // max(1, expansion_end_epoch)
        upper = min(max_start_epoch, current_max_start_epoch + grow)
    else:
        upper = max_start_epoch
    if upper <= min_start_epoch:
        raise ValueError(
            f"empty start-epoch window [{min_start_epoch}, {upper}): raise max_start_epoch / "
            f"current_max_start_epoch above min_start_epoch"
        )
    return upper


def sample_start_epoch(upper: int, *, min_start_epoch: int, generator: torch.Generator) -> int:
    """t ~ Uniform{T-, ..., U - 1}."""
    return int(torch.randint(min_start_epoch, upper, (1,), generator=generator).item())


# ---------------------------------------------------------------------------------------------------------
# the student unroll


def batch_schedule(num_images: int, batch_syn: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Index batches for ``steps`` inner steps: a random permutation cut into chunks of ``batch_syn``, redrawn
    when it runs out (sampling without replacement within a pass)."""
    batches: list[torch.Tensor] = []
    perm = torch.randperm(num_images, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_syn > num_images:
            perm, pos = torch.randperm(num_images, generator=generator), 0
        batches.append(perm[pos : pos + batch_syn])
        pos += batch_syn
    return batches


MEMORY_MODES = ("full", "checkpoint", "tesla")
EXACT_MEMORY_MODES = ("full", "checkpoint")  # "tesla" drops the later steps' Hessian terms
PRECISIONS = ("fp32", "bf16")


class BF16Products(TorchFunctionMode):
    """precision="bf16": convolutions and linear layers take bfloat16 operands and return their input's dtype;
    every other operation (norms, activations, pooling, the loss, and the derivatives of all of them) stays fp32.

    Where bf16 is native the convolutions are what it speeds up. Unlike ``torch.autocast``, whose bf16 outputs
    carry on through the norms, activations and pools, the elementwise work stays in fp32, which on the CPUs
    measured is faster than in bf16 (no conversions) and keeps those sums in fp32. With AvgPool2x2, 0.75-0.83x
    the time per outer iteration of autocast (around the network) with avg_pool2d on an AMD EPYC with avx512_bf16
    (medians of 3 rounds, IPC 1 / 50 and IPC 10 / 20; benchmarks/results/speed_cpu_forms_2026-12-02.md), gradient
    cosine to fp32 0.993-0.999, at more memory in full mode (5.8-5.9 against 3.9-4.0 GiB at IPC 10 / 20: the norms
    save fp32 tensors). On a 2-core Intel Xeon with AMX the products form was again the faster one: 0.82-0.83x
    the time of autocast (both with AvgPool2x2) at IPC 10 / 20, 0.91-0.98x at IPC 1 / 50
    (speed_cpu_forms_amx_2026-12-02.md).
    """

    PRODUCTS = frozenset({F.conv1d, F.conv2d, F.conv3d, F.linear})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.PRODUCTS:
            return func(*args, **kwargs)
        out_dtype = (args[0] if args else kwargs["input"]).dtype
        low = [a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        kwargs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in kwargs.items()}
        return func(*low, **kwargs).to(out_dtype)


@dataclass(frozen=True)
class InnerSteps:
    """Everything inner step n needs besides theta_n, so that it can be replayed bit for bit.

    ``decode(idx)`` gives the synthetic images of a batch ([b, C, H, W], training space) with a graph to the
    learnables; ``label_loss(logits, idx)`` the loss against that batch's labels. Every random draw of a step
    (DSA, random pairing) comes from ``generator`` (None: the global CPU generator), whose state before the
    step is what a replay restores.
    """

    model: nn.Module
    layout: ParamLayout
    decode: Callable[[torch.Tensor], torch.Tensor]
    label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: list[torch.Tensor]
    dsa_config: DSAConfig | None
    generator: torch.Generator | None
    precision: str = "fp32"

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state() if self.generator is not None else torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        if self.generator is not None:
            self.generator.set_state(state)
        else:
            torch.set_rng_state(state)

    def loss(self, theta: torch.Tensor, n: int, *, graph_to_images: bool = True) -> torch.Tensor:
        """This rank's part of the inner loss l(f(A_n(x_Bn); theta), y_Bn) of step n, a scalar.

        Under torchrun every rank decodes and augments the whole batch (cheap next to the network, and the
        DSA draws stay those of one process) and runs the network on its slice; the parts sum to the batch mean.
        """
        idx = self.batches[n]
        with torch.set_grad_enabled(graph_to_images and torch.is_grad_enabled()):
            x = self.decode(idx)                                    # [b, C, H, W], training space
            if self.dsa_config is not None:
                x = dsa(x, config=self.dsa_config, generator=self.generator)
        mine = local_positions(len(idx))
        with self.network_precision():
            logits = functional_call(self.model, self.layout.unflatten(theta), (x[mine],))
        part = self.label_loss(logits.to(theta.dtype), idx[mine])  # a no-op unless the network returned bf16
        return part if mine == slice(0, len(idx)) else part * (logits.shape[0] / len(idx))

    def network_precision(self) -> contextlib.AbstractContextManager:
        """What the student network runs under: BF16Products for precision="bf16", nothing for fp32."""
        return BF16Products() if self.precision == "bf16" else contextlib.nullcontext()

    def gradient(self, theta: torch.Tensor, n: int, *, create_graph: bool, graph_to_images: bool = True) -> torch.Tensor:
        """(Rank-local part of) the inner gradient grad_theta l at step n, [P]."""
        (grad,) = torch.autograd.grad(self.loss(theta, n, graph_to_images=graph_to_images), theta,
                                      create_graph=create_graph)
        return grad


def unroll_student(
    model: nn.Module,
    layout: ParamLayout,
    start: torch.Tensor,
    *,
    decode: Callable[[torch.Tensor], torch.Tensor],
    label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    syn_lr: torch.Tensor,
    batches: list[torch.Tensor],
    dsa_config: DSAConfig | None,
    generator: torch.Generator | None,
    memory: str = "full",
    learnables: tuple[torch.Tensor, ...] = (),
    precision: str = "fp32",
) -> torch.Tensor:
    """Train a student from ``start`` [P] for len(batches) SGD steps on synthetic batches; return theta_N [P].

    ``memory="full"`` keeps the graph of every step until the outer backward (memory grows with
    syn_steps x batch_syn, as in MTT). ``memory="checkpoint"`` keeps only theta_n [P] and the generator state
    of each step and replays one step at a time in the backward pass: the same gradients, memory flat in
    syn_steps, about one extra forward and backward per step. ``memory="tesla"`` replays like checkpoint mode
    but with TESLA's approximate gradient (module docstring). In checkpoint and tesla mode ``learnables`` must
    list every tensor that ``decode`` and ``label_loss`` read and that should get a gradient (synthetic factors,
    label logits); ``syn_lr`` gets its gradient in every mode.
    """
    if memory not in MEMORY_MODES or precision not in PRECISIONS:
        raise ValueError(f"memory={memory!r}, precision={precision!r}: use memory in {MEMORY_MODES} and precision in "
                         f"{PRECISIONS}")
    steps = InnerSteps(model=model, layout=layout, decode=decode, label_loss=label_loss, batches=batches,
                       dsa_config=dsa_config, generator=generator, precision=precision)
    if memory in ("checkpoint", "tesla"):
        return _CheckpointedUnroll.apply(steps, memory == "checkpoint", start, syn_lr, *learnables)
    theta = start.detach().clone().requires_grad_(True)
    for n in range(len(batches)):
        mine = replicated(theta)  # every rank's slice uses theta_n: its cotangent is summed over ranks
        theta = theta - syn_lr * sum_of_partials(steps.gradient(mine, n, create_graph=True))
    return theta


class _CheckpointedUnroll(torch.autograd.Function):
    """theta_N of the unroll, with a backward pass that replays the steps last to first (exact, reverse mode).

    With theta_{n+1} = theta_n - alpha g_n and the adjoint a = dL/dtheta_{n+1}, one replayed step gives
    dL/dtheta_n = a - alpha H_n a, dL/dalpha += -<g_n, a> and dL/dphi += -alpha (dg_n/dphi)^T a for the
    learnables phi, where H_n a and (dg_n/dphi)^T a come from one double backward of <g_n, a>. With
    ``exact=False`` (memory="tesla") the H_n a term is neither computed nor applied: a stays dL/dtheta_N.
    """

    @staticmethod
    def forward(ctx, steps: InnerSteps, exact: bool, start: torch.Tensor, syn_lr: torch.Tensor,
                *learnables: torch.Tensor):
        alpha = syn_lr.detach()
        # theta_n for n = 0 .. N-1, the only per-step memory: one block allocated up front, so that N small
        # allocations do not land between the steps' large activation buffers and fragment the heap
        thetas = start.new_empty((len(steps.batches), start.numel()))   # [N, P]
        states: list[torch.Tensor] = []      # the generator state before step n
        theta = start.detach().clone()       # updated in place: [P]
        for n in range(len(steps.batches)):
            thetas[n].copy_(theta)
            states.append(steps.rng_state())
            with torch.enable_grad():
                leaf = thetas[n].detach().requires_grad_(True)
                grad = all_reduce_sum(steps.gradient(leaf, n, create_graph=False, graph_to_images=False))
            theta.sub_(alpha * grad)
        ctx.steps, ctx.exact, ctx.thetas, ctx.states = steps, exact, thetas, states
        ctx.save_for_backward(syn_lr, *learnables)
        return theta

    @staticmethod
    def backward(ctx, adjoint: torch.Tensor):
        steps: InnerSteps = ctx.steps
        syn_lr, *learnables = ctx.saved_tensors
        alpha = syn_lr.detach()
        grads: list[torch.Tensor | None] = [None] * len(learnables)
        alpha_grad = torch.zeros_like(alpha)
        after = steps.rng_state()  # restored at the end: the caller's generator moves on as after the forward
        for n in reversed(range(len(steps.batches))):
            steps.set_rng_state(ctx.states[n])
            with torch.enable_grad():
                leaf = ctx.thetas[n].detach().requires_grad_(True)
                wrt = [leaf, *learnables] if ctx.exact else list(learnables)
                grad = steps.gradient(leaf, n, create_graph=bool(wrt))   # this rank's part g_n^r
                outs = torch.autograd.grad(grad, wrt, grad_outputs=adjoint, allow_unused=True) if wrt else []
                hvp, vjps = (outs[0], outs[1:]) if ctx.exact else (None, outs)
            # replicated: alpha's gradient and the adjoint use the whole g_n and H_n a; the learnables' parts
            # are summed over ranks by the caller (distributed.reduce_partial_grads) before the update
            alpha_grad = alpha_grad - torch.dot(all_reduce_sum(grad.detach()), adjoint)
            hvp = all_reduce_sum(hvp) if hvp is not None else None
            for j, vjp in enumerate(vjps):
                if vjp is not None:
                    grads[j] = -alpha * vjp if grads[j] is None else grads[j] - alpha * vjp
            if hvp is not None:  # None for tesla, or a network whose loss is linear in theta
                adjoint = adjoint - alpha * hvp
        steps.set_rng_state(after)
        return (None, None, adjoint, alpha_grad, *grads)


def graph_bytes_per_step(steps: InnerSteps, start: torch.Tensor) -> int:
    """Bytes that full mode keeps alive per inner step: the tensors that autograd saves for step 0's forward and
    create_graph backward, each storage counted once. Measured, so it holds for any network and batch size;
    the generator is left as it was."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    state = steps.rng_state()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        theta = start.detach().clone().requires_grad_(True)
        steps.gradient(replicated(theta), 0, create_graph=True)
    steps.set_rng_state(state)
    return sum(sizes.values())


def trajectory_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (1 = no closer than where it started)."""
    span = torch.sum((start - target) ** 2)
    if not torch.isfinite(span) or span <= 0:
        raise ValueError(
            "the expert segment has zero or non-finite length: the expert did not move between the start and "
            "target epochs; check the expert files (mttlss info EXPERTS) or raise expert_epochs"
        )
    return torch.sum((student - target) ** 2) / span
