"""Differentiable Siamese Augmentation (DSA), with the field's exact semantics (method.md section 10.2).

Mode 'S': each call draws ONE family uniformly from the strategy for the whole batch; magnitudes are
drawn per sample. Every draw comes from `generator` (on the CPU, then moved to x.device), so two calls
with identically seeded generators apply identical transforms on any device: that is the "Siamese" part
(the real batch and the synthetic batch see the same augmentation). All operations are differentiable
with respect to x, so gradients reach the synthetic images through the augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


@dataclass(frozen=True)
class DSAConfig:
    """DSA hyperparameters; defaults are MTT's `ParamDiffAug`. u ~ U[0, 1] is drawn per sample."""

    strategy: str = "color_crop_cutout_flip_scale_rotate"  # families joined by '_'; "" = identity
    brightness: float = 1.0  # x + (u - 0.5) * brightness, i.e. +-0.5
    saturation: float = 2.0  # m_px + (x - m_px) * (u * saturation); m_px = channel mean per pixel
    contrast: float = 0.5  # m_img + (x - m_img) * (u + contrast); m_img = per-image mean over C, H, W
    ratio_crop_pad: float = 0.125  # integer translation up to +-round(ratio * size) px per axis, zero fill
    ratio_cutout: float = 0.5  # one square of round(ratio * size) px zeroed around a random centre
    prob_flip: float = 0.5  # horizontal flip probability per sample
    ratio_scale: float = 1.2  # sx, sy independent ~ U[1 / ratio, ratio]
    ratio_rotate: float = 15.0  # degrees, rotation ~ U[-deg, deg]

    def __post_init__(self):
        dsa_families(self.strategy)  # fail at construction on an unknown family

    @classmethod
    def none(cls) -> "DSAConfig":
        """The identity augmentation (e.g. to switch DSA off in evaluation or tests)."""
        return cls(strategy="")


def dsa_families(strategy: str) -> list[str]:
    """Families of a strategy string, e.g. 'color_crop_flip' -> ['color', 'crop', 'flip']; '' -> []."""
    families = [f for f in strategy.split("_") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown DSA family {unknown} in strategy {strategy!r}; valid families: {list(FAMILIES)} "
                         "joined by '_' (or '' for no augmentation)")
    return families


# ---------------------------------------------------------------------------------------------------
# helpers: per-sample random draws on the CPU generator, moved to x's device and dtype
# ---------------------------------------------------------------------------------------------------


def _rand(n: int, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=g).to(device=x.device, dtype=x.dtype)


def _randint(low: int, high: int, *, n: int, like: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """[n] integers in [low, high) drawn on the CPU with ``g``, moved to ``like``'s device."""
    return torch.randint(low, high, (n,), generator=g).to(like.device)


def _px(ratio: float, size: int) -> int:
    return int(ratio * size + 0.5)  # round half up, as the reference does


# ---------------------------------------------------------------------------------------------------
# families; x: [N, C, H, W], any space (DSA is applied in training space)
# ---------------------------------------------------------------------------------------------------


def _color(x, cfg, g):
    n = x.shape[0]
    x = x + (_rand(n, x, g).view(-1, 1, 1, 1) - 0.5) * cfg.brightness
    m_px = x.mean(dim=1, keepdim=True)
    x = m_px + (x - m_px) * (_rand(n, x, g).view(-1, 1, 1, 1) * cfg.saturation)
    m_img = x.mean(dim=(1, 2, 3), keepdim=True)
    return m_img + (x - m_img) * (_rand(n, x, g).view(-1, 1, 1, 1) + cfg.contrast)


def _crop(x, cfg, g):
    # Integer translation with zero fill: gather from a 1-pixel zero-padded copy, sending every
    # out-of-range source index to the padding. Indexing is differentiable (a scatter-add backward).
    n, _, h, w = x.shape
    sh, sw = _px(cfg.ratio_crop_pad, h), _px(cfg.ratio_crop_pad, w)
    ty = _randint(-sh, sh + 1, n=n, like=x, g=g)
    tx = _randint(-sw, sw + 1, n=n, like=x, g=g)
    rows = (torch.arange(h, device=x.device) + ty[:, None] + 1).clamp(0, h + 1)  # [N, H], padded coords
    cols = (torch.arange(w, device=x.device) + tx[:, None] + 1).clamp(0, w + 1)  # [N, W]
    x_pad = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put the broadcast dims first: [N, H, W, C].
    return x_pad[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x, cfg, g):
    n, _, h, w = x.shape
    ch, cw = _px(cfg.ratio_cutout, h), _px(cfg.ratio_cutout, w)
    # Centre range as in the reference: [0, size - 1] for odd squares, [0, size] for even ones.
    cy = _randint(0, h + (1 - ch % 2), n=n, like=x, g=g)
    cx = _randint(0, w + (1 - cw % 2), n=n, like=x, g=g)
    top, left = cy - ch // 2, cx - cw // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= top[:, None]) & (r < top[:, None] + ch)  # [N, H]
    in_cols = (c >= left[:, None]) & (c < left[:, None] + cw)  # [N, W]
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # [N, H, W]
    return x * keep[:, None].to(x.dtype)


def _flip(x, cfg, g):
    flip = _rand(x.shape[0], x, g) < cfg.prob_flip
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x, theta):
    # align_corners=True in both calls, as the reference does: then the affine map acts on pixel
    # centres with the corner pixels fixed at +-1, so scale 1 / rotation 0 reproduce x exactly and
    # trajectories trained with reference DSA see the same augmentation.
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x, cfg, g):
    n, r = x.shape[0], cfg.ratio_scale
    sx = _rand(n, x, g) * (r - 1.0 / r) + 1.0 / r
    sy = _rand(n, x, g) * (r - 1.0 / r) + 1.0 / r
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)  # [N, 2, 3]
    return _affine(x, theta)


def _rotate(x, cfg, g):
    n = x.shape[0]
    a = (_rand(n, x, g) - 0.5) * 2 * cfg.ratio_rotate / 180 * math.pi
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_OPS = {"color": _color, "crop": _crop, "cutout": _cutout, "flip": _flip, "scale": _scale, "rotate": _rotate}


def dsa(x: torch.Tensor, *, config: DSAConfig = DSAConfig(), generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one randomly chosen DSA family to the batch x: [N, C, H, W]; returns the same shape.

    `generator` must be a CPU generator (None uses the global CPU RNG). Seed two generators identically
    to augment two batches the same way.
    """
    if x.dim() != 4:
        raise ValueError(f"dsa expects a batch [N, C, H, W], got shape {list(x.shape)}")
    families = dsa_families(config.strategy)
    if not families or x.shape[0] == 0:
        return x
    family = families[int(torch.randint(len(families), (1,), generator=generator))]
    return _OPS[family](x, config, generator)
