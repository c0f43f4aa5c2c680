"""Labels of the synthetic set: hard class indices, or learnable soft labels (logits) as in DATM.

Soft labels are stored as logits [n, classes]; the training target is softmax(logits) (temperature 1).
Initialisation (method.md section 6, applied to the *decoded* initial images): the mean of the experts'
final-checkpoint logits over the experts that classify the image as its class, falling back to the mean
over all experts when none does (DATM's formula would divide by zero there).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from mttlss.models import ParamLayout


@torch.no_grad()
def expert_logits(model: nn.Module, layout: ParamLayout, *, params: torch.Tensor, x: torch.Tensor,
                  batch_size: int = 512) -> torch.Tensor:
    """Logits [n, classes] of the network with flat parameters ``params`` [P] on ``x`` [n, C, H, W] (training space)."""
    named = layout.unflatten(params.to(x.device))
    out = [functional_call(model, named, (x[i : i + batch_size],)) for i in range(0, len(x), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def init_soft_labels(
    model: nn.Module, layout: ParamLayout, *, final_params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """DATM-style initial logits [n, classes] for images ``x`` (training space) of classes ``y`` [n]."""
    total = None
    hits = torch.zeros(len(x), device=x.device)
    all_sum = None
    for params in final_params:
        logits = expert_logits(model, layout, params=params, x=x)
        correct = (logits.argmax(1) == y.to(x.device)).float()
        total = logits * correct[:, None] if total is None else total + logits * correct[:, None]
        all_sum = logits.clone() if all_sum is None else all_sum + logits
        hits += correct
    mean_correct = total / hits.clamp(min=1)[:, None]
    mean_all = all_sum / len(final_params)
    return torch.where(hits[:, None] > 0, mean_correct, mean_all).float()
