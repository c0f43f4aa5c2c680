"""Where distillation starts: the storage budget -> real training images -> the synthetic set.

``init_synthetic`` solves the budget (images per class that fit), picks real training images per class and
builds the pixel set or re-codes them into low-rank subspaces: form A's 2-D PCA or form B's truncated SVD
(method.md 5.5 and section 6). With ``init="correct"`` (DATM) it picks images an expert's final checkpoint
classifies correctly (``correct_candidates``); ``"real"`` picks any; ``"noise"`` keeps the shapes and redraws
every factor.
The soft labels' starting logits come from the same experts (``labels.init_soft_labels``); the budget makes
room for them when ``count_labels`` is set and the labels may be soft.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mttlss.config import DistillConfig
from mttlss.data import RealData
from mttlss.experts import ExpertSet
from mttlss.labels import expert_logits, stored_label_floats
from mttlss.models import ParamLayout
from mttlss.parameterization import Budget, LowRankSet, PixelSet, SyntheticSet, VectorSet, solve_budget


def budget_for(cfg: DistillConfig, data: RealData) -> Budget:
    """The storage budget of ``cfg`` on ``data`` (only its num_classes, channels and image_size are read)."""
    soft = cfg.label_mode != "hard"  # hard labels store nothing: label_dtype and label_topk do not apply
    per_label = (stored_label_floats(num_classes=data.num_classes, dtype=cfg.label_dtype, topk=cfg.label_topk)
                 if soft else None)
    return solve_budget(
        num_classes=data.num_classes, image_shape=(data.channels, *data.image_size), ipc=cfg.ipc, param=cfg.param,
        rank=cfg.rank, code=cfg.code, subspaces=cfg.subspaces, num_subspaces=cfg.num_subspaces,
        share_channels=cfg.share_channels, count_labels=cfg.count_labels and soft, label_floats_per_image=per_label,
        max_images_per_class=cfg.max_images_per_class, subspace_mean=cfg.subspace_mean,
        mapper_downsample=cfg.mapper_downsample,
    )


@torch.no_grad()
def _correct_for(model: nn.Module, layout: ParamLayout, *, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 num_classes: int) -> list[torch.Tensor]:
    """Per class, the indices of the images in ``x`` that the network ``params`` [P] classifies correctly."""
    pred = expert_logits(model, layout, params=params, x=x).argmax(1).cpu()
    y = y.cpu()
    return [torch.nonzero((y == c) & (pred == c)).flatten() for c in range(num_classes)]


def correct_candidates(*, experts: ExpertSet, model: nn.Module, layout: ParamLayout, x_train: torch.Tensor,
                       data: RealData, needed: int, device: str) -> list[torch.Tensor]:
    """Per class, real images an expert's final checkpoint classifies correctly (DATM); when a class has fewer
    than ``needed``, the next expert's correct images are added (the parameterisation tops up the rest).

    ``x_train`` [N, C, H, W] is the training split in training space, on ``device``.
    """
    y = data.y_train.to(device)
    pooled: list[torch.Tensor] | None = None
    for k in experts.indices:
        final = experts.checkpoints(k, [experts.epochs])[0]
        found = _correct_for(model, layout, params=final, x=x_train, y=y, num_classes=data.num_classes)
        pooled = found if pooled is None else [torch.unique(torch.cat([a, b])) for a, b in zip(pooled, found)]
        if all(len(c) >= needed for c in pooled):
            break
    return pooled


def init_synthetic(cfg: DistillConfig, *, data: RealData, x_train: torch.Tensor, model: nn.Module,
                   layout: ParamLayout, experts: ExpertSet, device: str) -> tuple[SyntheticSet, dict]:
    """Build the synthetic set from real training images ``x_train`` [N, C, H, W] (training space), per
    ``cfg.init``; returns it on ``device`` with a JSON-able record of the budget (and reconstruction error)."""
    budget = budget_for(cfg, data)
    gen = torch.Generator().manual_seed(cfg.seed)
    candidates = None
    if cfg.init == "correct":
        candidates = correct_candidates(experts=experts, model=model, layout=layout, x_train=x_train, data=data,
                                        needed=budget.images_per_class, device=device)
    x_cpu, y_cpu = x_train.cpu(), data.y_train.cpu()
    shape = (data.channels, *data.image_size)
    info: dict[str, Any] = {"budget": budget.as_dict()}
    common = dict(num_classes=data.num_classes, images_per_class=budget.images_per_class, generator=gen,
                  candidates=candidates)
    subspace = dict(rank=cfg.rank, subspaces=cfg.subspaces, num_subspaces=cfg.num_subspaces, pairing=cfg.pairing)
    if cfg.param == "pixel":
        syn = PixelSet.from_real(x_cpu, y_cpu, **common)
    elif cfg.param == "vector":
        syn, rec = VectorSet.from_real(x_cpu, y_cpu, **common, **subspace, subspace_mean=cfg.subspace_mean,
                                       mapper_downsample=cfg.mapper_downsample)
        info.update(rec)
    else:
        syn, rec = LowRankSet.from_real(x_cpu, y_cpu, **common, **subspace, code=cfg.code,
                                        share_channels=cfg.share_channels)
        info.update(rec)
    if cfg.init == "noise":
        with torch.no_grad():
            for p in syn.parameters():
                p.normal_(generator=gen)
    assert syn.image_shape == shape
    return syn.to(device), info
