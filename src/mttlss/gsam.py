"""GSAM: surrogate gap guided sharpness-aware minimisation (Zhuang et al., ICLR 2022), around a base optimiser.

FTD and DATM train their experts with it for flatter trajectories (method.md section 4). Written from the
paper's Algorithm 1, with a constant rho (FTD's expert script keeps rho constant; so is the experts' lr).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor


def _dot(a: list[Tensor | None], b: list[Tensor | None]) -> Tensor:
    """sum_i <a_i, b_i> over the parameters (a missing gradient counts as zero)."""
    terms = [(x * y).sum() for x, y in zip(a, b) if x is not None and y is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class GSAM:
    """One GSAM step per ``step(closure)``, over all parameters of ``base`` taken as one vector w:

        g    = grad L(w)                            the gradient at the weights
        w'   = w + rho * g / ||g||                  the ascent to the perturbed weights
        g_p  = grad L(w')                           the gradient of the perturbed loss
        g_perp = g - (<g, g_p> / ||g_p||^2) g_p     the part of g orthogonal to g_p
        d    = g_p - alpha * g_perp                 descend on L_p, ascend on the surrogate gap along g_perp

    then w is restored and ``base`` steps with ``d`` as the gradient (SGD with its lr, momentum and weight
    decay; the decay is the base's, not part of g). alpha = 0 is SAM; rho = 0 and alpha = 0 is a plain ``base``
    step. ``buffers`` (BatchNorm running statistics) are restored after the perturbed pass, so only the pass at
    w updates them. ``eps`` keeps the two divisions finite when a gradient is zero.
    """

    def __init__(self, *, base: torch.optim.Optimizer, rho: float, alpha: float, buffers: Iterable[Tensor] = (),
                 eps: float = 1e-12):
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"GSAM rho={rho} must be finite and >= 0; pass e.g. rho=0.01 (FTD's value)")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"GSAM alpha={alpha} must be finite and >= 0; pass e.g. alpha=0.3 (FTD's CIFAR-10 value)")
        self.base, self.rho, self.alpha, self.eps = base, float(rho), float(alpha), eps
        self.buffers = list(buffers)

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups  # so an lr schedule can set the base's lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _params(self) -> list[Tensor]:
        return [p for group in self.base.param_groups for p in group["params"] if p.requires_grad]

    def _gradients(self, closure: Callable[[], Tensor], params: list[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
        """The loss at the current parameters and its gradient (one forward and backward pass)."""
        self.base.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        return loss.detach(), [p.grad for p in params]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """``closure()``: the scalar loss at the current parameters (forward only, called twice on the same
        batch). Returns the loss at w, before the step."""
        params = self._params()
        loss, g = self._gradients(closure, params)
        weights = [p.detach().clone() for p in params]
        stats = [b.detach().clone() for b in self.buffers]
        scale = self.rho / (_dot(g, g).sqrt() + self.eps)
        for p, gi in zip(params, g):
            if gi is not None:
                p.add_(gi * scale)
        _, g_p = self._gradients(closure, params)
        for p, w in zip(params, weights):
            p.copy_(w)
        for b, s in zip(self.buffers, stats):
            b.copy_(s)
        parallel = _dot(g, g_p) / (_dot(g_p, g_p) + self.eps)  # g_parallel = parallel * g_p
        for p, gi, gpi in zip(params, g, g_p):
            p.grad = self._direction(gi, gpi, parallel)
        self.base.step()
        return loss

    def _direction(self, g: Tensor | None, g_p: Tensor | None, parallel: Tensor) -> Tensor | None:
        """d = g_p - alpha * (g - parallel * g_p) for one parameter; None when it had no gradient at all."""
        if g is None and g_p is None:
            return None
        g = torch.zeros_like(g_p) if g is None else g
        g_p = torch.zeros_like(g) if g_p is None else g_p
        return g_p - self.alpha * (g - parallel * g_p)
