"""Trajectory matching: the student unroll, the normalised parameter distance, the start-epoch window.

One outer iteration of MTT (method.md section 3):

    theta_0 = theta*_t                                    (expert checkpoint t)
    theta_{n+1} = theta_n - alpha * grad l(f(A_n(x_Bn); theta_n), y_Bn)     n = 0 .. N-1  (N = syn_steps)
    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2       (M = expert_epochs)

Parameters travel as one flat vector [P] (the layout of ``model.named_parameters()``), which is also how
expert trajectories are stored, and are cut into named views for ``torch.func.functional_call``. The
inner gradients are built with ``create_graph=True``, so L backpropagates through the whole unroll into
the synthetic factors, the labels and alpha (second order, exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mttlss.augment import DSAConfig, dsa
from mttlss.evaluate import soft_cross_entropy

# ---------------------------------------------------------------------------------------------------------
# flat parameter vectors


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of a model's parameters, in ``named_parameters()`` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamLayout":
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def num_params(self) -> int:
        return sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` [P]; gradients w.r.t. the views flow back to ``flat``."""
        if flat.numel() != self.num_params:
            raise ValueError(
                f"a flat parameter vector of {flat.numel()} values does not fit this network "
                f"({self.num_params} parameters): the experts were trained with another architecture"
            )
        chunks = torch.split(flat, self.numels)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def as_list(self) -> list[list]:
        return [[n, list(s)] for n, s in zip(self.names, self.shapes)]


def flatten_params(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one detached flat vector [P]."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


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


def soft_label_loss(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy against softmax(label logits): DATM's loss for learnable soft labels."""
    return soft_cross_entropy(logits, F.softmax(target_logits, dim=1))


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
) -> torch.Tensor:
    """Train a student from ``start`` [P] for len(batches) SGD steps on synthetic batches; return theta_N [P].

    ``decode(idx)`` gives the synthetic images of a batch ([b, C, H, W], training space) with a graph to the
    factors; ``label_loss(logits, idx)`` the loss against that batch's labels. The returned vector keeps the
    graph of every step (memory grows with syn_steps x batch_syn, as in MTT).
    """
    theta = start.detach().clone().requires_grad_(True)
    for idx in batches:
        x = decode(idx)
        if dsa_config is not None:
            x = dsa(x, config=dsa_config, generator=generator)
        logits = functional_call(model, layout.unflatten(theta), (x,))
        loss = label_loss(logits, idx)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - syn_lr * grad
    return theta


def trajectory_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2 (1 = no closer than where it started)."""
    span = torch.sum((start - target) ** 2)
    if not torch.isfinite(span) or span <= 0:
        raise ValueError(
            "the expert segment has zero or non-finite length: the expert did not move between the start and "
            "target epochs; check the expert files (mttlss info EXPERTS) or raise expert_epochs"
        )
    return torch.sum((student - target) ** 2) / span
