"""Synthetic sets (pixel / low-rank) and the storage-budget solver (method.md section 5).

Every synthetic set decodes to images in the *training space*: whatever space the networks are trained
in (mean/std-normalised pixels, or ZCA-whitened ones). This module never converts between spaces; the
caller passes real images already in that space to ``from_real`` and gets decoded images in it back.

Two parameterisations:

- ``PixelSet``: the images themselves, ``images`` [n, C, H, W].
- ``LowRankSet``: form A of method.md 5.1. K subspaces, each with dimension mappers
  U_k [Cm, H, r] and V_k [Cm, W, r] (Cm = 1 when the mappers are shared across channels), and one code
  per synthetic image, a full core S_i [C, r, r] or a diagonal s_i [C, r]. Image i in subspace k is
  ``x_i[c] = U_k[c] @ S_i[c] @ V_k[c]^T``.

Subspaces are either ``per_class`` (K_c = ``num_subspaces`` per class, K = K_c * classes; class c owns
subspaces c*K_c .. c*K_c + K_c - 1) or ``shared`` (K = ``num_subspaces`` subspaces used by every class).

Image order is always class-major: images 0..n-1 are class 0, n..2n-1 class 1, and so on, where n is
``images_per_class``.

The budget rule ("same storage", method.md 5.3): stored floats (mappers + codes) <= IPC * classes * C*H*W.
``solve_budget`` turns an IPC into the number of low-rank images per class that fits.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from mttlss.config import CHOICES

PARAMS, CODES, SUBSPACES, PAIRINGS = (CHOICES[k] for k in ("param", "code", "subspaces", "pairing"))

__all__ = [
    "BudgetError",
    "Budget",
    "solve_budget",
    "budget_report",
    "SyntheticSet",
    "PixelSet",
    "LowRankSet",
    "build_synthetic_set",
]


# ----------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(allowed)}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_image_shape(image_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be three positive ints (C, H, W), got {image_shape!r}")
    return shape  # type: ignore[return-value]


def _check_rank(rank: int, image_shape: tuple[int, int, int]) -> None:
    _check_positive_int("rank", rank)
    _, h, w = image_shape
    if rank > min(h, w):
        # U_k has orthonormal columns in R^H and V_k in R^W: r cannot exceed min(H, W).
        raise ValueError(f"rank {rank} exceeds min(H, W) = {min(h, w)} for images of shape {image_shape}; "
                         f"set rank={min(h, w)} or smaller")


def _check_lowrank_args(*, rank: int, code: str, subspaces: str, num_subspaces: int, image_shape) -> None:
    _check_choice("code kind", code, CODES)
    _check_choice("subspaces mode", subspaces, SUBSPACES)
    _check_positive_int("num_subspaces", num_subspaces)
    _check_rank(rank, image_shape)


# ----------------------------------------------------------------------------------------------------
# Budget
# ----------------------------------------------------------------------------------------------------


class BudgetError(ValueError):
    """The requested setting does not fit the storage budget; the message says what to change."""


@dataclass(frozen=True)
class Budget:
    """Storage accounting of one setting (floats, i.e. tensor elements, or float32-equivalents = bytes / 4).

    ``label_floats`` is the size of soft labels for this many images as stored (images_per_class * classes *
    the label floats per image: classes for float32 logits, less for float16 or top-k), whether or not they were
    counted against the budget; ``labels_counted`` says whether the image count was reduced to make room for them.
    """

    images_per_class: int
    num_classes: int
    budget_floats: int  # IPC * classes * C * H * W (the "same storage" rule)
    mapper_floats: int  # dimension mappers (0 for pixel)
    code_floats: int  # basis vectors / codes (or pixels for the pixel set)
    label_floats: int | float  # soft labels as stored, float32-equivalents (a half where float16 or int16 leave one)
    labels_counted: bool

    def stored_floats(self, *, with_labels: bool) -> int | float:
        return self.mapper_floats + self.code_floats + (self.label_floats if with_labels else 0)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _num_subspaces_total(subspaces: str, num_subspaces: int, num_classes: int) -> int:
    return num_subspaces * num_classes if subspaces == "per_class" else num_subspaces


def _mapper_floats(*, image_shape, rank, subspaces, num_subspaces, num_classes, share_channels) -> int:
    c, h, w = image_shape
    k = _num_subspaces_total(subspaces, num_subspaces, num_classes)
    cm = 1 if share_channels else c
    return k * cm * (h + w) * rank


def _code_floats_per_image(*, image_shape, rank, code) -> int:
    c = image_shape[0]
    return c * rank * rank if code == "full" else c * rank


def _floats(value: Fraction) -> int | float:
    """A float count as an int where it is whole (float16 and int16 storage can leave a half float32)."""
    return int(value) if value.denominator == 1 else float(value)


def _lowrank_images_per_class(*, num_classes, image_shape, ipc, rank, code, subspaces, num_subspaces,
                              share_channels, count_labels, label_floats) -> int:
    """Uncapped n = floor((budget - mappers) / (classes * (s + L))), exact (L a Fraction); may be <= 0."""
    c, h, w = image_shape
    budget = ipc * num_classes * c * h * w
    mappers = _mapper_floats(image_shape=image_shape, rank=rank, subspaces=subspaces,
                             num_subspaces=num_subspaces, num_classes=num_classes, share_channels=share_channels)
    s = _code_floats_per_image(image_shape=image_shape, rank=rank, code=code)
    per_image = s + (label_floats if count_labels else 0)
    return int((budget - mappers) // (num_classes * per_image))


def solve_budget(*, num_classes: int, image_shape: tuple[int, int, int], ipc: int, param: str = "lowrank",
                 rank: int = 4, code: str = "full", subspaces: str = "per_class", num_subspaces: int = 1,
                 share_channels: bool = False, count_labels: bool = False,
                 label_floats_per_image: float | None = None, max_images_per_class: int | None = None) -> Budget:
    """Images per class and stored floats for one setting (method.md 5.3).

    pixel: images_per_class = ipc (``count_labels`` only records the flag; pixel sets are never shrunk).
    lowrank (form A): n = floor((IPC*classes*C*H*W - mappers) / (classes * (s + L))), capped by
    ``max_images_per_class``; raises ``BudgetError`` when n < 1. L = ``label_floats_per_image`` when
    ``count_labels``, else 0: one soft label as stored, in float32-equivalents (``labels.stored_label_floats``);
    None means classes (float32 logits of every class).
    """
    _check_choice("param", param, PARAMS)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("ipc", ipc)
    image_shape = _check_image_shape(image_shape)
    if max_images_per_class is not None:
        _check_positive_int("max_images_per_class", max_images_per_class)
    if label_floats_per_image is not None and not label_floats_per_image > 0:
        raise ValueError(f"label_floats_per_image must be positive, got {label_floats_per_image}; None: classes")
    label_floats = Fraction(num_classes if label_floats_per_image is None else label_floats_per_image)
    c, h, w = image_shape
    budget = ipc * num_classes * c * h * w

    if param == "pixel":
        return Budget(images_per_class=ipc, num_classes=num_classes, budget_floats=budget, mapper_floats=0,
                      code_floats=budget, label_floats=_floats(ipc * num_classes * label_floats),
                      labels_counted=bool(count_labels))

    _check_lowrank_args(rank=rank, code=code, subspaces=subspaces, num_subspaces=num_subspaces,
                        image_shape=image_shape)
    kw = dict(num_classes=num_classes, image_shape=image_shape, ipc=ipc, code=code, subspaces=subspaces,
              num_subspaces=num_subspaces, share_channels=share_channels, count_labels=count_labels,
              label_floats=label_floats)
    n = _lowrank_images_per_class(rank=rank, **kw)
    if n < 1:
        raise BudgetError(_budget_error_message(rank=rank, **kw))
    if max_images_per_class is not None:
        n = min(n, max_images_per_class)
    mappers = _mapper_floats(image_shape=image_shape, rank=rank, subspaces=subspaces,
                             num_subspaces=num_subspaces, num_classes=num_classes, share_channels=share_channels)
    s = _code_floats_per_image(image_shape=image_shape, rank=rank, code=code)
    return Budget(images_per_class=n, num_classes=num_classes, budget_floats=budget, mapper_floats=mappers,
                  code_floats=n * num_classes * s, label_floats=_floats(n * num_classes * label_floats),
                  labels_counted=bool(count_labels))


def _budget_error_message(*, rank: int, **kw) -> str:
    c, h, w = kw["image_shape"]
    budget = kw["ipc"] * kw["num_classes"] * c * h * w
    mappers = _mapper_floats(image_shape=kw["image_shape"], rank=rank, subspaces=kw["subspaces"],
                             num_subspaces=kw["num_subspaces"], num_classes=kw["num_classes"],
                             share_channels=kw["share_channels"])
    msg = (f"rank {rank} ({kw['code']} codes, {kw['subspaces']} subspaces, num_subspaces={kw['num_subspaces']}, "
           f"labels {'counted' if kw['count_labels'] else 'not counted'}) leaves no room for even one image per "
           f"class: the budget is {budget} floats (IPC {kw['ipc']}) and the dimension mappers alone take "
           f"{mappers}. ")
    for r in range(rank - 1, 0, -1):
        n = _lowrank_images_per_class(rank=r, **kw)
        if n >= 1:
            return msg + f"Largest feasible rank: {r} ({n} images per class); set rank={r} (`--set rank={r}` for mttlss distill, `--rank {r}` for mttlss budget)."
    msg += "No rank fits with these settings (largest feasible rank: none). "
    # Try each single change at rank 1 and at the requested rank; report those that help.
    changes = [
        ("code=diag", dict(code="diag")),
        ("subspaces=shared num_subspaces=1", dict(subspaces="shared", num_subspaces=1)),
        ("num_subspaces=1", dict(num_subspaces=1)),
        ("share_channels=true", dict(share_channels=True)),
        ("count_labels=false", dict(count_labels=False)),
    ]
    fixes = []
    for flag, change in changes:
        trial = {**kw, **change}
        if trial == kw:
            continue
        for r in range(rank, 0, -1):
            n = _lowrank_images_per_class(rank=r, **trial)
            if n >= 1:
                fixes.append(f"{flag} with --rank {r} ({n} images per class)")
                break
    if fixes:
        return msg + "Options that fit: " + "; ".join(fixes) + "."
    return msg + "Raise --ipc, or use --param pixel."


def budget_report(**kwargs) -> str:
    """Human-readable table for ``mttlss budget``: same keyword arguments as ``solve_budget``.

    Rows: the requested rank and its neighbours (2, 4, 8, 16, capped at min(H, W)) for both code kinds.
    Columns: images per class and stored floats, with labels not counted and counted. "-" = infeasible.
    """
    kw = dict(kwargs)
    param = kw.get("param", "lowrank")
    _check_choice("param", param, PARAMS)
    image_shape = _check_image_shape(kw["image_shape"])
    kw["image_shape"] = image_shape
    c, h, w = image_shape
    head = (f"budget: IPC {kw['ipc']} x {kw['num_classes']} classes x {c}x{h}x{w} = "
            f"{kw['ipc'] * kw['num_classes'] * c * h * w} floats")
    size = kw.get("label_floats_per_image") or kw["num_classes"]  # one soft label as stored, float32-equivalents
    per_label = f"{size:g} float{'' if size == 1 else 's'} per image"
    if param == "pixel":
        b = solve_budget(**kw)
        return "\n".join([head, "param pixel", f"images per class: {b.images_per_class}",
                          f"stored floats: {b.stored_floats(with_labels=False)} (+ {b.label_floats} for soft labels, "
                          f"{per_label}, = {b.stored_floats(with_labels=True)})"])
    rank = kw.get("rank", 4)
    _check_rank(rank, image_shape)
    ranks = sorted({r for r in (2, 4, 8, 16, rank) if r <= min(h, w)})
    lines = [head,
             f"param lowrank (form A), subspaces {kw.get('subspaces', 'per_class')}, "
             f"num_subspaces {kw.get('num_subspaces', 1)}, share_channels {kw.get('share_channels', False)}, "
             f"max_images_per_class {kw.get('max_images_per_class')}"]
    cols = ["rank", "code", "img/class", "stored", "img/class(+labels)", "stored(+labels)"]
    rows = [cols]
    for r in ranks:
        for code in CODES:
            cells = [str(r) + (" *" if (r == rank and code == kw.get("code", "full")) else ""), code]
            for counted in (False, True):
                try:
                    b = solve_budget(**{**kw, "rank": r, "code": code, "count_labels": counted})
                    cells += [str(b.images_per_class), str(b.stored_floats(with_labels=counted))]
                except BudgetError:
                    cells += ["-", "-"]
            rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        lines.append("  ".join(cell.rjust(wd) for cell, wd in zip(row, widths)))
    lines.append("* = requested setting; '-' = infeasible; 'stored' = mappers + codes, "
                 f"'stored(+labels)' adds soft labels ({per_label}, as stored)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Choosing real images
# ----------------------------------------------------------------------------------------------------


def _choose_real_indices(y: torch.Tensor, *, num_classes: int, images_per_class: int,
                         generator: torch.Generator | None,
                         candidates: list[torch.Tensor] | None) -> tuple[torch.Tensor, int]:
    """Indices into the real set, [classes * n], class-major; and how many picks repeat an image.

    Per class, the candidates (e.g. images an expert classifies correctly) are drawn first in random order;
    when there are fewer than n of them the rest of the class fills up. When the class itself has fewer
    than n images (e.g. CIFAR-100's 500 against n = 624), images are reused in a new random order.
    """
    y = torch.as_tensor(y).reshape(-1).cpu()
    if candidates is not None and len(candidates) != num_classes:
        raise ValueError(f"candidates must hold one index list per class ({num_classes}), got {len(candidates)}")
    out, repeated = [], 0
    for c in range(num_classes):
        members = torch.nonzero(y == c).reshape(-1)
        if members.numel() == 0:
            raise ValueError(f"class {c} has no real images; check the labels y (expected 0..{num_classes - 1})")
        members = members[torch.randperm(members.numel(), generator=generator)]
        if candidates is not None:
            cand = torch.as_tensor(candidates[c], dtype=torch.long).reshape(-1).cpu()
            if cand.numel() and not bool((y[cand] == c).all()):
                raise ValueError(f"candidates[{c}] contains images of another class")
            cand = cand[torch.randperm(cand.numel(), generator=generator)]
            rest = members[~torch.isin(members, cand)]
            members = torch.cat([cand, rest])
        picks = [members[:images_per_class]]
        have = picks[0].numel()
        while have < images_per_class:
            extra = members[torch.randperm(members.numel(), generator=generator)][: images_per_class - have]
            picks.append(extra)
            repeated += extra.numel()
            have += extra.numel()
        out.append(torch.cat(picks))
    return torch.cat(out), repeated


# ----------------------------------------------------------------------------------------------------
# Synthetic sets
# ----------------------------------------------------------------------------------------------------


class SyntheticSet(nn.Module):
    """Base class: a synthetic set that decodes to images in the training space (class-major order)."""

    num_classes: int
    image_shape: tuple[int, int, int]
    _images_per_class: int

    @property
    def images_per_class(self) -> int:
        return self._images_per_class

    @property
    def num_images(self) -> int:
        return self.num_classes * self._images_per_class

    def labels_hard(self) -> torch.Tensor:
        """[n] int64, class-major: all images of class 0, then class 1, ..."""
        device = next(self.parameters()).device
        return torch.arange(self.num_classes, device=device).repeat_interleave(self._images_per_class)

    def _index(self, idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if idx is None:
            return torch.arange(self.num_images, device=device)
        idx = torch.as_tensor(idx, device=device)
        if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
            raise ValueError(f"idx must be a 1-D integer tensor of image indices, got {idx.dtype} {tuple(idx.shape)}")
        return idx.long()

    def decode(self, idx: torch.Tensor | None = None, *,
               generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, idx: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(idx, generator=generator)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def stored_floats(self) -> int:
        """Floats in the factors (labels excluded)."""
        return sum(p.numel() for p in self.parameters())

    def _kwargs(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description; ``build_synthetic_set`` rebuilds an empty set from it."""
        return {
            "type": self.kind,
            **self._kwargs(),
            "num_images": self.num_images,
            "stored_floats": self.stored_floats(),
            "shapes": {name: list(p.shape) for name, p in self.named_parameters()},
        }


class PixelSet(SyntheticSet):
    """Plain synthetic images, parameter ``images`` [n, C, H, W] in the training space."""

    kind = "pixel"

    def __init__(self, *, num_classes: int, image_shape, images_per_class: int):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("images_per_class", images_per_class)
        self.num_classes = num_classes
        self.image_shape = _check_image_shape(image_shape)
        self._images_per_class = images_per_class
        self.images = nn.Parameter(torch.zeros(num_classes * images_per_class, *self.image_shape))

    def _kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "images_per_class": self.images_per_class}

    def decode(self, idx: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """[len(idx), C, H, W], training space. ``generator`` is accepted for interface parity and unused."""
        if idx is None:
            return self.images
        return self.images.index_select(0, self._index(idx, self.images.device))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"images": [self.images]}

    @classmethod
    def from_real(cls, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, images_per_class: int,
                  generator: torch.Generator | None = None,
                  candidates: list[torch.Tensor] | None = None) -> "PixelSet":
        """Initialise from real images ``x`` [N, C, H, W] (training space) with labels ``y`` [N]."""
        if x.dim() != 4 or x.shape[0] != torch.as_tensor(y).numel():
            raise ValueError(f"x must be [N, C, H, W] with one label per image; got x {tuple(x.shape)}, "
                             f"y {tuple(torch.as_tensor(y).shape)}")
        idx, _ = _choose_real_indices(y, num_classes=num_classes, images_per_class=images_per_class,
                                      generator=generator, candidates=candidates)
        s = cls(num_classes=num_classes, image_shape=tuple(x.shape[1:]), images_per_class=images_per_class)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        s.images = nn.Parameter(x[idx.to(x.device)].detach().to(dtype).clone())
        return s


def _top_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors (columns, descending eigenvalue) of symmetric [..., d, d] matrices -> [..., d, r]."""
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[..., -r:].flip(-1)


class LowRankSet(SyntheticSet):
    """Form A low-rank synthetic set (method.md 5.1): shared dimension mappers + per-image codes.

    Parameters: ``mappers_U`` [K, Cm, H, r], ``mappers_V`` [K, Cm, W, r], ``codes`` [n, C, r, r] (full) or
    [n, C, r] (diag). Non-persistent buffer ``subspace_of`` [n]: each image's subspace under fixed pairing
    (derived from the constructor arguments, so it is not part of the state_dict).

    A freshly constructed set holds U, V = the first r columns of the identity and zero codes (so the
    gradient w.r.t. the codes is non-zero); use ``from_real`` for the 2-D PCA initialisation.
    """

    kind = "lowrank"

    def __init__(self, *, num_classes: int, image_shape, images_per_class: int, rank: int, code: str = "full",
                 subspaces: str = "per_class", num_subspaces: int = 1, share_channels: bool = False,
                 pairing: str = "fixed"):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("images_per_class", images_per_class)
        image_shape = _check_image_shape(image_shape)
        _check_lowrank_args(rank=rank, code=code, subspaces=subspaces, num_subspaces=num_subspaces,
                            image_shape=image_shape)
        _check_choice("pairing", pairing, PAIRINGS)
        self.num_classes = num_classes
        self.image_shape = image_shape
        self._images_per_class = images_per_class
        self.rank, self.code, self.subspaces = rank, code, subspaces
        self.num_subspaces, self.share_channels, self.pairing = num_subspaces, bool(share_channels), pairing
        c, h, w = image_shape
        k = _num_subspaces_total(subspaces, num_subspaces, num_classes)
        cm = 1 if self.share_channels else c
        n = num_classes * images_per_class
        self.mappers_U = nn.Parameter(torch.eye(h, rank).expand(k, cm, h, rank).clone())
        self.mappers_V = nn.Parameter(torch.eye(w, rank).expand(k, cm, w, rank).clone())
        code_shape = (n, c, rank, rank) if code == "full" else (n, c, rank)
        self.codes = nn.Parameter(torch.zeros(code_shape))
        self.register_buffer("subspace_of", self._fixed_subspaces(), persistent=False)

    @property
    def total_subspaces(self) -> int:
        return self.mappers_U.shape[0]

    def _fixed_subspaces(self) -> torch.Tensor:
        n = self.images_per_class
        j = torch.arange(self.num_classes * n)
        within = j % n  # position inside its class
        if self.subspaces == "per_class":
            return (j // n) * self.num_subspaces + within % self.num_subspaces
        return within % self.num_subspaces

    def _kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "images_per_class": self.images_per_class, "rank": self.rank, "code": self.code,
                "subspaces": self.subspaces, "num_subspaces": self.num_subspaces,
                "share_channels": self.share_channels, "pairing": self.pairing}

    def describe(self) -> dict:
        # num_subspaces_total = K (all subspaces), e.g. to scale the mappers' learning rate (method.md 5.7).
        return {**super().describe(), "num_subspaces_total": self.total_subspaces}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"codes": [self.codes], "mappers": [self.mappers_U, self.mappers_V]}

    def subspaces_for(self, idx: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Subspace of each selected image [len(idx)]: fixed, or drawn when pairing="random" and a generator
        is given (uniform over the subspaces the image's class may use)."""
        if self.pairing == "fixed" or generator is None:
            return self.subspace_of[idx]
        draw = torch.randint(self.num_subspaces, (idx.numel(),), generator=generator,
                             device=generator.device).to(idx.device)
        if self.subspaces == "per_class":
            return (idx // self.images_per_class) * self.num_subspaces + draw
        return draw

    def decode(self, idx: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """[len(idx), C, H, W] in the training space, differentiable w.r.t. mappers and codes."""
        idx = self._index(idx, self.codes.device)
        k = self.subspaces_for(idx, generator=generator)
        return self._compose(self.mappers_U[k], self.codes[idx], self.mappers_V[k])

    def _compose(self, u: torch.Tensor, codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # u [b, Cm, H, r], v [b, Cm, W, r]; Cm = 1 broadcasts over channels (expand is a view, no copy).
        c = self.image_shape[0]
        u = u.expand(-1, c, -1, -1)
        v = v.expand(-1, c, -1, -1)
        if self.code == "full":
            return torch.einsum("bchr,bcrs,bcws->bchw", u, codes, v)
        return torch.einsum("bchr,bcr,bcwr->bchw", u, codes, v)

    @classmethod
    def from_real(cls, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, images_per_class: int, rank: int,
                  code: str = "full", subspaces: str = "per_class", num_subspaces: int = 1,
                  share_channels: bool = False, pairing: str = "fixed", generator: torch.Generator | None = None,
                  candidates: list[torch.Tensor] | None = None) -> tuple["LowRankSet", dict]:
        """2-D PCA initialisation (method.md 5.5) from real images ``x`` [N, C, H, W] (training space).

        Each synthetic image starts as the projection of one chosen real image onto its (fixed-pairing)
        subspace. Returns (set, info); info["relative_reconstruction_error"] = ||X - decode|| / ||X|| over the
        chosen real images, info["repeated_images"] = how many picks reuse a real image (class too small).
        """
        if x.dim() != 4 or x.shape[0] != torch.as_tensor(y).numel():
            raise ValueError(f"x must be [N, C, H, W] with one label per image; got x {tuple(x.shape)}, "
                             f"y {tuple(torch.as_tensor(y).shape)}")
        s = cls(num_classes=num_classes, image_shape=tuple(x.shape[1:]), images_per_class=images_per_class,
                rank=rank, code=code, subspaces=subspaces, num_subspaces=num_subspaces,
                share_channels=share_channels, pairing=pairing)
        idx, repeated = _choose_real_indices(y, num_classes=num_classes, images_per_class=images_per_class,
                                             generator=generator, candidates=candidates)
        real = x[idx.to(x.device)].detach()  # [n, C, H, W], class-major like the synthetic set
        xd = real.double()
        c, h, w = s.image_shape
        k_total = s.total_subspaces
        u = torch.empty(k_total, s.mappers_U.shape[1], h, rank, dtype=torch.float64, device=x.device)
        v = torch.empty(k_total, s.mappers_V.shape[1], w, rank, dtype=torch.float64, device=x.device)
        sub = s.subspace_of.to(x.device)
        for k in range(k_total):
            xk = xd[sub == k]  # [m, C, H, W]
            if xk.shape[0] == 0:
                # No image is assigned to this subspace under fixed pairing: a random orthonormal basis.
                g = torch.randn(2, u.shape[1], max(h, w), rank, dtype=torch.float64, generator=generator,
                                device=generator.device if generator is not None else "cpu")
                u[k] = torch.linalg.qr(g[0, :, :h])[0].to(x.device)
                v[k] = torch.linalg.qr(g[1, :, :w])[0].to(x.device)
                continue
            if share_channels:
                xk = xk.reshape(-1, 1, h, w)  # pool channels: one fit over all channels
            u[k] = _top_eigvecs(torch.einsum("mchw,mcgw->chg", xk, xk), rank)  # Σ X X^T per channel
            v[k] = _top_eigvecs(torch.einsum("mchw,mchv->cwv", xk, xk), rank)  # Σ X^T X per channel
        uk = u[sub].expand(-1, c, -1, -1)
        vk = v[sub].expand(-1, c, -1, -1)
        core = torch.einsum("nchr,nchw,ncws->ncrs", uk, xd, vk)  # least squares: U^T X V (orthonormal U, V)
        codes = core if code == "full" else torch.diagonal(core, dim1=-2, dim2=-1)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        s.mappers_U = nn.Parameter(u.to(dtype))
        s.mappers_V = nn.Parameter(v.to(dtype))
        s.codes = nn.Parameter(codes.to(dtype).contiguous())
        s.subspace_of = sub
        with torch.no_grad():
            err = (s.decode().double() - xd).norm() / xd.norm().clamp_min(1e-300)
        return s, {"relative_reconstruction_error": float(err), "repeated_images": int(repeated)}


def build_synthetic_set(description: dict) -> SyntheticSet:
    """Rebuild an empty set with the right shapes from ``describe()``; then call ``load_state_dict``."""
    d = dict(description)
    kind = d.pop("type", None)
    classes = {"pixel": PixelSet, "lowrank": LowRankSet}
    if kind not in classes:
        raise ValueError(f"unknown synthetic set type {kind!r} in description; valid: {', '.join(classes)}")
    cls = classes[kind]
    # Keep only constructor arguments: describe() also carries derived entries (num_images, shapes, ...).
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    missing = [name for name in accepted if name not in d and name in ("num_classes", "image_shape",
                                                                          "images_per_class", "rank")]
    if missing:
        raise ValueError(f"description of a {kind} set lacks {missing}; it must come from describe()")
    kwargs = {name: d[name] for name in accepted if name in d}
    kwargs["image_shape"] = tuple(kwargs["image_shape"])
    s = cls(**kwargs)
    shapes = description.get("shapes")
    if shapes is not None:
        have = {name: list(p.shape) for name, p in s.named_parameters()}
        if have != {k: list(v) for k, v in shapes.items()}:
            raise ValueError(f"description shapes {shapes} do not match the rebuilt set {have}; "
                             f"the description was edited or written by an incompatible version")
    return s
