"""An exponential moving average (EMA) of a synthetic set's learnable parameters (method.md 11.4).

FTD evaluates an EMA of its synthetic images; here the average covers every learnable tensor of the set:
the pixels [n, C, H, W] (training space) of a pixel set, or the dimension mappers and codes of a low-rank set.
Each update is

    ema <- decay * ema + (1 - decay) * current

done by ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` (a foreach lerp). The average
starts at the set it is built from (``new_ema`` copies it, as FTD's ``ModelEmaV2`` copies its initial images),
so after k updates the starting set keeps the weight decay**k.

Label logits and the learned step size alpha are not averaged (FTD averages only the images).
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from mttlss.parameterization import SyntheticSet


def ema_enabled(decay: float | None) -> bool:
    """None and 0 turn the average off (decay 0 would only copy the current set)."""
    return bool(decay)


def new_ema(synthetic: SyntheticSet, decay: float | None) -> AveragedModel | None:
    """An EMA that starts at ``synthetic`` (its parameters copied, on their device), or None when ``decay`` is off."""
    if not ema_enabled(decay):
        return None
    ema = AveragedModel(synthetic, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.module.requires_grad_(False)  # a copy that is only read: decoding it builds no graph
    ema.update_parameters(synthetic)  # n_averaged 0 -> 1: the copy is the average's start, later calls average
    return ema


def update_ema(ema: AveragedModel | None, synthetic: SyntheticSet) -> None:
    """Fold the current parameters of ``synthetic`` into ``ema`` (nothing when the average is off)."""
    if ema is not None:
        ema.update_parameters(synthetic)


def averaged_set(ema: AveragedModel) -> SyntheticSet:
    """The averaged synthetic set itself: same class, description and state-dict keys as the set it follows."""
    return ema.module


def ema_state(ema: AveragedModel) -> dict[str, torch.Tensor]:
    """CPU copies of everything the average holds ("module.<name>" parameters and "n_averaged"): a checkpoint's part."""
    return {k: v.detach().cpu().clone() for k, v in ema.state_dict().items()}
