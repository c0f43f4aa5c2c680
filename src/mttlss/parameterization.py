"""Synthetic sets (pixel / low-rank) and the storage-budget solver (method.md section 5).

Every synthetic set decodes to images in the *training space*: whatever space the networks are trained
in (mean/std-normalised pixels, or ZCA-whitened ones). This module never converts between spaces; the
caller passes real images already in that space to ``from_real`` and gets decoded images in it back.

Three parameterisations:

- ``PixelSet``: the images themselves, ``images`` [n, C, H, W].
- ``LowRankSet``: form A of method.md 5.1. K subspaces, each with dimension mappers
  U_k [Cm, H, r] and V_k [Cm, W, r] (Cm = 1 when the mappers are shared across channels), and one code
  per synthetic image, a full core S_i [C, r, r] or a diagonal s_i [C, r]. Image i in subspace k is
  ``x_i[c] = U_k[c] @ S_i[c] @ V_k[c]^T``.
- ``VectorSet``: form B of method.md 5.2, the vector subspace (a PCA model of flattened images, RTP's global
  bases). K subspaces, each with one mapper M_k [D', r] over flattened images at the mapper resolution
  (D' = C * H/f * W/f, f = ``mapper_downsample``) and optionally a mean mu_k [D'], and one code b_i [r] per
  image: ``x_i = upsample(M_k @ b_i + mu_k)`` (bilinear to H x W when f > 1, as RTP upsamples its bases).

Subspaces (form A and B alike) are either ``per_class`` (K_c = ``num_subspaces`` per class, K = K_c * classes;
class c owns subspaces c*K_c .. c*K_c + K_c - 1) or ``shared`` (K = ``num_subspaces`` subspaces used by every
class); ``_SubspaceSet`` holds that assignment and the pairing of codes with subspaces.

Image order is always class-major: images 0..n-1 are class 0, n..2n-1 class 1, and so on, where n is
``images_per_class``.

The budget rule ("same storage", method.md 5.3): stored floats (mappers + codes, + form B's means) <= IPC *
classes * C*H*W. ``solve_budget`` turns an IPC into the number of low-rank images per class that fits.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mttlss.config import CHOICES, check_form_knobs

PARAMS, CODES, SUBSPACES, PAIRINGS = (CHOICES[k] for k in ("param", "code", "subspaces", "pairing"))

__all__ = [
    "BudgetError",
    "Budget",
    "solve_budget",
    "budget_report",
    "SyntheticSet",
    "PixelSet",
    "LowRankSet",
    "VectorSet",
    "mapper_shape",
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


def mapper_shape(image_shape, mapper_downsample: int = 1) -> tuple[int, int, int]:
    """(C, H/f, W/f): the resolution of form B's mappers and means, f = ``mapper_downsample`` (1: full)."""
    c, h, w = _check_image_shape(image_shape)
    f = mapper_downsample
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise ValueError(f"mapper_downsample must be a positive integer (1: full resolution, 2: half), got {f!r}")
    if h % f or w % f:
        raise ValueError(f"mapper_downsample={f} does not divide the image size {h}x{w}; set mapper_downsample to a "
                         f"factor of both H and W (1: full resolution, 2: half resolution where H and W are even)")
    return c, h // f, w // f


def _check_vector_args(*, rank: int, subspaces: str, num_subspaces: int, image_shape,
                       mapper_downsample: int) -> int:
    """Validate form B's arguments; returns D' = C * H/f * W/f, the length of a mapper column."""
    _check_choice("subspaces mode", subspaces, SUBSPACES)
    _check_positive_int("num_subspaces", num_subspaces)
    _check_positive_int("rank", rank)
    c, h, w = mapper_shape(image_shape, mapper_downsample)
    d = c * h * w
    if rank > d:
        # M_k has orthonormal columns in R^D': r cannot exceed D'.
        raise ValueError(f"rank {rank} exceeds D' = {d}, the length of a form B mapper column at resolution "
                         f"{c}x{h}x{w}; set rank={d} or smaller")
    return d


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
    mapper_floats: int  # dimension mappers, and form B's per-subspace means when on (0 for pixel)
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


def _vector_mapper_floats(*, image_shape, rank, subspaces, num_subspaces, num_classes, subspace_mean,
                          mapper_downsample) -> int:
    """Form B: K mappers of D' x r floats, plus K means of D' floats when ``subspace_mean``."""
    c, h, w = mapper_shape(image_shape, mapper_downsample)
    k = _num_subspaces_total(subspaces, num_subspaces, num_classes)
    return k * c * h * w * (rank + (1 if subspace_mean else 0))


def _vector_images_per_class(*, num_classes, image_shape, ipc, rank, subspaces, num_subspaces, subspace_mean,
                             mapper_downsample, count_labels, label_floats) -> int:
    """Uncapped form B n = floor((budget - mappers - means) / (classes * (r + L))), exact; may be <= 0."""
    c, h, w = image_shape
    budget = ipc * num_classes * c * h * w
    mappers = _vector_mapper_floats(image_shape=image_shape, rank=rank, subspaces=subspaces,
                                    num_subspaces=num_subspaces, num_classes=num_classes,
                                    subspace_mean=subspace_mean, mapper_downsample=mapper_downsample)
    per_image = rank + (label_floats if count_labels else 0)
    return int((budget - mappers) // (num_classes * per_image))


def solve_budget(*, num_classes: int, image_shape: tuple[int, int, int], ipc: int, param: str = "lowrank",
                 rank: int = 4, code: str = "full", subspaces: str = "per_class", num_subspaces: int = 1,
                 share_channels: bool = False, count_labels: bool = False,
                 label_floats_per_image: float | None = None, max_images_per_class: int | None = None,
                 subspace_mean: bool = False, mapper_downsample: int = 1) -> Budget:
    """Images per class and stored floats for one setting (method.md 5.3).

    pixel: images_per_class = ipc (``count_labels`` only records the flag; pixel sets are never shrunk).
    lowrank (form A): n = floor((IPC*classes*C*H*W - mappers) / (classes * (s + L))).
    vector (form B): n = floor((IPC*classes*C*H*W - K*D'*r - means) / (classes * (r + L))), D' = C*H/f*W/f
    (f = ``mapper_downsample``), means = K*D' with ``subspace_mean``, else 0.
    Both capped by ``max_images_per_class``; ``BudgetError`` when n < 1. L = ``label_floats_per_image`` when
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
    check_form_knobs(param, dict(code=code, share_channels=share_channels, subspace_mean=subspace_mean,
                                 mapper_downsample=mapper_downsample))
    label_floats = Fraction(num_classes if label_floats_per_image is None else label_floats_per_image)
    c, h, w = image_shape
    budget = ipc * num_classes * c * h * w

    if param == "pixel":
        return Budget(images_per_class=ipc, num_classes=num_classes, budget_floats=budget, mapper_floats=0,
                      code_floats=budget, label_floats=_floats(ipc * num_classes * label_floats),
                      labels_counted=bool(count_labels))
    common = dict(num_classes=num_classes, image_shape=image_shape, ipc=ipc, subspaces=subspaces,
                  num_subspaces=num_subspaces, count_labels=count_labels, label_floats=label_floats)
    if param == "vector":
        n, mappers, s = _vector_counts(rank=rank, subspace_mean=bool(subspace_mean),
                                       mapper_downsample=mapper_downsample, **common)
    else:
        n, mappers, s = _lowrank_counts(rank=rank, code=code, share_channels=share_channels, **common)
    if max_images_per_class is not None:
        n = min(n, max_images_per_class)
    return Budget(images_per_class=n, num_classes=num_classes, budget_floats=budget, mapper_floats=mappers,
                  code_floats=n * num_classes * s, label_floats=_floats(n * num_classes * label_floats),
                  labels_counted=bool(count_labels))


def _lowrank_counts(*, rank: int, **kw) -> tuple[int, int, int]:
    """Form A: (uncapped images per class, mapper floats, code floats per image); BudgetError when n < 1."""
    _check_lowrank_args(rank=rank, code=kw["code"], subspaces=kw["subspaces"], num_subspaces=kw["num_subspaces"],
                        image_shape=kw["image_shape"])
    n = _lowrank_images_per_class(rank=rank, **kw)
    if n < 1:
        raise BudgetError(_budget_error_message(rank=rank, **kw))
    mappers = _mapper_floats(image_shape=kw["image_shape"], rank=rank, subspaces=kw["subspaces"],
                             num_subspaces=kw["num_subspaces"], num_classes=kw["num_classes"],
                             share_channels=kw["share_channels"])
    return n, mappers, _code_floats_per_image(image_shape=kw["image_shape"], rank=rank, code=kw["code"])


def _vector_counts(*, rank: int, **kw) -> tuple[int, int, int]:
    """Form B: (uncapped images per class, mapper + mean floats, code floats per image = r); BudgetError when n < 1."""
    _check_vector_args(rank=rank, subspaces=kw["subspaces"], num_subspaces=kw["num_subspaces"],
                       image_shape=kw["image_shape"], mapper_downsample=kw["mapper_downsample"])
    n = _vector_images_per_class(rank=rank, **kw)
    if n < 1:
        raise BudgetError(_vector_budget_error_message(rank=rank, **kw))
    mappers = _vector_mapper_floats(image_shape=kw["image_shape"], rank=rank, subspaces=kw["subspaces"],
                                    num_subspaces=kw["num_subspaces"], num_classes=kw["num_classes"],
                                    subspace_mean=kw["subspace_mean"], mapper_downsample=kw["mapper_downsample"])
    return n, mappers, rank  # one code vector b_i [r] per image


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


def _vector_budget_error_message(*, rank: int, **kw) -> str:
    c, h, w = kw["image_shape"]
    budget = kw["ipc"] * kw["num_classes"] * c * h * w
    mappers = _vector_mapper_floats(image_shape=kw["image_shape"], rank=rank, subspaces=kw["subspaces"],
                                    num_subspaces=kw["num_subspaces"], num_classes=kw["num_classes"],
                                    subspace_mean=kw["subspace_mean"], mapper_downsample=kw["mapper_downsample"])
    what = "mappers and means" if kw["subspace_mean"] else "mappers"
    msg = (f"rank {rank} (param=vector, {kw['subspaces']} subspaces, num_subspaces={kw['num_subspaces']}, "
           f"mapper_downsample={kw['mapper_downsample']}, subspace_mean={str(kw['subspace_mean']).lower()}, labels "
           f"{'counted' if kw['count_labels'] else 'not counted'}) leaves no room for even one image per class: the "
           f"budget is {budget} floats (IPC {kw['ipc']}) and the {what} alone take {mappers}. ")
    largest = _largest_vector_rank(rank - 1, kw)
    if largest is not None:
        r, n = largest
        msg += (f"Largest feasible rank: {r} ({n} images per class); set rank={r} (`--set rank={r}` for mttlss "
                f"distill, `--rank {r}` for mttlss budget). ")
    else:
        msg += "No rank fits with these settings (largest feasible rank: none). "
    changes = [
        ("subspaces=shared num_subspaces=1", dict(subspaces="shared", num_subspaces=1)),
        ("num_subspaces=1", dict(num_subspaces=1)),
        ("mapper_downsample=2", dict(mapper_downsample=2)),
        ("subspace_mean=false", dict(subspace_mean=False)),
        ("count_labels=false", dict(count_labels=False)),
    ]
    fixes, tried = [], [kw]
    for flag, change in changes:
        trial = {**kw, **change}
        if trial in tried:  # no change, or the same setting as an earlier entry
            continue
        tried.append(trial)
        try:
            found = _largest_vector_rank(rank, trial)
        except ValueError:  # e.g. mapper_downsample=2 on odd image sizes
            continue
        if found is not None:
            fixes.append(f"{flag} with rank {found[0]} ({found[1]} images per class)")
    if fixes:
        return msg + "Other settings that fit: " + "; ".join(fixes) + "."
    return msg + "Raise --ipc, or use --param lowrank (form A) or --param pixel."


def _largest_vector_rank(top: int, kw: dict) -> tuple[int, int] | None:
    """(r, n) for the largest form B rank r <= ``top`` that fits at least one image per class, else None."""
    for r in range(top, 0, -1):
        n = _vector_images_per_class(rank=r, **kw)
        if n >= 1:
            return r, n
    return None


def _report_layout(kw: dict, *, rank: int) -> tuple[str, str, list[int], list[str | None]]:
    """``budget_report``'s setting line, what "stored" counts, the table's ranks and its code kinds (form B: [None])."""
    c, h, w = kw["image_shape"]
    if kw.get("param", "lowrank") == "vector":
        check_form_knobs("vector", kw)
        f = kw.get("mapper_downsample", 1)
        d = _check_vector_args(rank=rank, subspaces=kw.get("subspaces", "per_class"),
                               num_subspaces=kw.get("num_subspaces", 1), image_shape=kw["image_shape"],
                               mapper_downsample=f)
        mc, mh, mw = mapper_shape(kw["image_shape"], f)
        setting = (f"param vector (form B), mapper rows D' = {d} ({mc}x{mh}x{mw}), subspaces "
                   f"{kw.get('subspaces', 'per_class')}, num_subspaces {kw.get('num_subspaces', 1)}, subspace_mean "
                   f"{kw.get('subspace_mean', False)}, mapper_downsample {f}, "
                   f"max_images_per_class {kw.get('max_images_per_class')}")
        stored = "mappers + means + codes" if kw.get("subspace_mean") else "mappers + codes"
        return setting, stored, sorted({r for r in (2, 4, 8, 16, rank) if r <= d}), [None]
    _check_rank(rank, kw["image_shape"])
    setting = (f"param lowrank (form A), subspaces {kw.get('subspaces', 'per_class')}, "
               f"num_subspaces {kw.get('num_subspaces', 1)}, share_channels {kw.get('share_channels', False)}, "
               f"max_images_per_class {kw.get('max_images_per_class')}")
    return setting, "mappers + codes", sorted({r for r in (2, 4, 8, 16, rank) if r <= min(h, w)}), list(CODES)


def budget_report(**kwargs) -> str:
    """Human-readable table for ``mttlss budget``: same keyword arguments as ``solve_budget``.

    Rows: the requested rank and its neighbours (2, 4, 8, 16; form A: capped at min(H, W), for both code kinds;
    form B: capped at D'). Columns: images per class and stored floats, with labels not counted and counted.
    "-" = infeasible.
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
    setting, stored, ranks, codes = _report_layout(kw, rank=rank)
    cols = ["rank", *(["code"] if codes != [None] else []), "img/class", "stored", "img/class(+labels)",
            "stored(+labels)"]
    rows = [cols]
    for r in ranks:
        for code in codes:
            requested = r == rank and code in (None, kw.get("code", "full"))
            cells = [str(r) + (" *" if requested else ""), *([code] if code is not None else [])]
            for counted in (False, True):
                try:
                    b = solve_budget(**{**kw, "rank": r, **({"code": code} if code else {}), "count_labels": counted})
                    cells += [str(b.images_per_class), str(b.stored_floats(with_labels=counted))]
                except BudgetError:
                    cells += ["-", "-"]
            rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, setting, *("  ".join(cell.rjust(wd) for cell, wd in zip(row, widths)) for row in rows)]
    lines.append(f"* = requested setting; '-' = infeasible; 'stored' = {stored}, "
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


def _check_real(x: torch.Tensor, y) -> None:
    """The real images a set is initialised from: ``x`` [N, C, H, W] with one label per image in ``y`` [N]."""
    if x.dim() != 4 or x.shape[0] != torch.as_tensor(y).numel():
        raise ValueError(f"x must be [N, C, H, W] with one label per image; got x {tuple(x.shape)}, "
                         f"y {tuple(torch.as_tensor(y).shape)}")


def _param_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of a set's parameters initialised from ``x``: its own, or torch's default for integer images."""
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


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
        _check_real(x, y)
        idx, _ = _choose_real_indices(y, num_classes=num_classes, images_per_class=images_per_class,
                                      generator=generator, candidates=candidates)
        s = cls(num_classes=num_classes, image_shape=tuple(x.shape[1:]), images_per_class=images_per_class)
        dtype = _param_dtype(x)
        s.images = nn.Parameter(x[idx.to(x.device)].detach().to(dtype).clone())
        return s


def _top_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r eigenvectors (columns, descending eigenvalue) of symmetric [..., d, d] matrices -> [..., d, r]."""
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vecs[..., -r:].flip(-1)


class _SubspaceSet(SyntheticSet):
    """A set whose images each decode with one of K subspaces (forms A and B): ``subspace_of`` [n] under fixed
    pairing (a non-persistent buffer derived from the constructor arguments), a draw under random pairing."""

    subspaces: str
    num_subspaces: int
    pairing: str

    @property
    def total_subspaces(self) -> int:
        return _num_subspaces_total(self.subspaces, self.num_subspaces, self.num_classes)

    def _fixed_subspaces(self) -> torch.Tensor:
        n = self.images_per_class
        j = torch.arange(self.num_classes * n)
        within = j % n  # position inside its class
        if self.subspaces == "per_class":
            return (j // n) * self.num_subspaces + within % self.num_subspaces
        return within % self.num_subspaces

    def describe(self) -> dict:
        # num_subspaces_total = K (all subspaces), e.g. to scale the mappers' learning rate (method.md 5.7).
        return {**super().describe(), "num_subspaces_total": self.total_subspaces}

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


class LowRankSet(_SubspaceSet):
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

    def _kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "images_per_class": self.images_per_class, "rank": self.rank, "code": self.code,
                "subspaces": self.subspaces, "num_subspaces": self.num_subspaces,
                "share_channels": self.share_channels, "pairing": self.pairing}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"codes": [self.codes], "mappers": [self.mappers_U, self.mappers_V]}

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
        _check_real(x, y)
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
        dtype = _param_dtype(x)
        s.mappers_U = nn.Parameter(u.to(dtype))
        s.mappers_V = nn.Parameter(v.to(dtype))
        s.codes = nn.Parameter(codes.to(dtype).contiguous())
        s.subspace_of = sub
        with torch.no_grad():
            err = (s.decode().double() - xd).norm() / xd.norm().clamp_min(1e-300)
        return s, {"relative_reconstruction_error": float(err), "repeated_images": int(repeated)}


def _top_right_singular_vectors(rows: torch.Tensor, r: int, *, generator: torch.Generator | None) -> torch.Tensor:
    """[D, r] orthonormal columns: the top-r right singular vectors of ``rows`` [m, D] (float64), in descending
    order of singular value; where m < r, completed with random directions orthogonal to them."""
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)  # vh [min(m, D), D]
    top = vh[:r].T
    if top.shape[1] == r:
        return top
    extra = torch.randn(rows.shape[1], r - top.shape[1], dtype=rows.dtype, generator=generator,
                        device=generator.device if generator is not None else "cpu").to(rows.device)
    return torch.linalg.qr(torch.cat([top, extra], dim=1))[0]  # first columns: ``top`` up to sign


class VectorSet(_SubspaceSet):
    """Form B synthetic set (method.md 5.2): one mapper per subspace over flattened images + per-image codes.

    Parameters: ``mappers`` [K, D', r] (the dimension mappers M_k), ``codes`` [n, r] (the basis vectors b_i)
    and, with ``subspace_mean``, ``means`` [K, D'] (mu_k). D' = C * H' * W' at the mapper resolution
    (H', W') = (H, W) / ``mapper_downsample``. Image i in subspace k is ``upsample(M_k @ b_i + mu_k)``, reshaped
    to [C, H', W'] and, when the mapper resolution is below the image's, upsampled bilinearly to H x W (as RTP
    upsamples its half-resolution bases). Subspace assignment and pairing as in ``LowRankSet``.

    A freshly constructed set holds M_k = the first r columns of the identity, zero codes and zero means (so
    the gradient w.r.t. the codes is non-zero); use ``from_real`` for the truncated-SVD initialisation.
    """

    kind = "vector"

    def __init__(self, *, num_classes: int, image_shape, images_per_class: int, rank: int,
                 subspaces: str = "per_class", num_subspaces: int = 1, pairing: str = "fixed",
                 subspace_mean: bool = False, mapper_downsample: int = 1):
        super().__init__()
        _check_positive_int("num_classes", num_classes)
        _check_positive_int("images_per_class", images_per_class)
        image_shape = _check_image_shape(image_shape)
        d = _check_vector_args(rank=rank, subspaces=subspaces, num_subspaces=num_subspaces, image_shape=image_shape,
                               mapper_downsample=mapper_downsample)
        _check_choice("pairing", pairing, PAIRINGS)
        self.num_classes = num_classes
        self.image_shape = image_shape
        self._images_per_class = images_per_class
        self.rank, self.subspaces, self.num_subspaces, self.pairing = rank, subspaces, num_subspaces, pairing
        self.subspace_mean, self.mapper_downsample = bool(subspace_mean), mapper_downsample
        self.mapper_shape = mapper_shape(image_shape, mapper_downsample)  # (C, H', W')
        k = self.total_subspaces
        self.mappers = nn.Parameter(torch.eye(d, rank).expand(k, d, rank).clone())
        self.codes = nn.Parameter(torch.zeros(num_classes * images_per_class, rank))
        if self.subspace_mean:
            self.means = nn.Parameter(torch.zeros(k, d))
        self.register_buffer("subspace_of", self._fixed_subspaces(), persistent=False)

    def _kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "image_shape": list(self.image_shape),
                "images_per_class": self.images_per_class, "rank": self.rank, "subspaces": self.subspaces,
                "num_subspaces": self.num_subspaces, "pairing": self.pairing, "subspace_mean": self.subspace_mean,
                "mapper_downsample": self.mapper_downsample}

    def describe(self) -> dict:
        return {**super().describe(), "mapper_shape": list(self.mapper_shape)}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        # A mean, like a mapper, is shared by every image of its subspace: it takes the mappers' learning rate.
        return {"codes": [self.codes], "mappers": [self.mappers, *([self.means] if self.subspace_mean else [])]}

    def decode(self, idx: torch.Tensor | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """[len(idx), C, H, W] in the training space, differentiable w.r.t. mappers, codes and means."""
        idx = self._index(idx, self.codes.device)
        k = self.subspaces_for(idx, generator=generator)
        x = self._combine(k, self.codes[idx]).view(-1, *self.mapper_shape)  # [b, C, H', W']
        if self.mapper_downsample > 1:
            x = F.interpolate(x, size=self.image_shape[1:], mode="bilinear", align_corners=False)
        return x

    def _combine(self, k: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """[b, D'] = M_k @ b_i (+ mu_k) for subspaces ``k`` [b] and codes [b, r]: one matmul per distinct subspace
        (gathering a [b, D', r] mapper per image would take b times the mappers' memory)."""
        if k.numel() == 0:
            return codes.new_zeros(0, self.mappers.shape[1])
        order = torch.argsort(k, stable=True)
        ks, counts = torch.unique_consecutive(k[order], return_counts=True)
        pieces = [b @ self.mappers[j].T for j, b in zip(ks.tolist(), codes[order].split(counts.tolist()))]
        flat = torch.cat(pieces)[torch.argsort(order)]  # back to the order of ``k``
        return flat + self.means[k] if self.subspace_mean else flat

    @classmethod
    def from_real(cls, x: torch.Tensor, y: torch.Tensor, *, num_classes: int, images_per_class: int, rank: int,
                  subspaces: str = "per_class", num_subspaces: int = 1, pairing: str = "fixed",
                  subspace_mean: bool = False, mapper_downsample: int = 1, generator: torch.Generator | None = None,
                  candidates: list[torch.Tensor] | None = None) -> tuple["VectorSet", dict]:
        """Truncated-SVD initialisation (method.md 5.5, form B) from real images ``x`` [N, C, H, W] (training space).

        Per subspace, M_k = the top-r right singular vectors of its chosen real images, flattened at the mapper
        resolution (area-averaged when ``mapper_downsample`` > 1) and centred on their mean mu_k when
        ``subspace_mean``; each code is b_i = M_k^T (x_i - mu_k). Returns (set, info) as ``LowRankSet.from_real``:
        info["relative_reconstruction_error"] = ||X - decode|| / ||X|| over the chosen real images (at full
        resolution), info["repeated_images"] = how many picks reuse a real image (class too small).
        """
        _check_real(x, y)
        s = cls(num_classes=num_classes, image_shape=tuple(x.shape[1:]), images_per_class=images_per_class,
                rank=rank, subspaces=subspaces, num_subspaces=num_subspaces, pairing=pairing,
                subspace_mean=subspace_mean, mapper_downsample=mapper_downsample)
        idx, repeated = _choose_real_indices(y, num_classes=num_classes, images_per_class=images_per_class,
                                             generator=generator, candidates=candidates)
        xd = x[idx.to(x.device)].detach().double()  # [n, C, H, W], class-major like the synthetic set
        low = F.avg_pool2d(xd, s.mapper_downsample) if s.mapper_downsample > 1 else xd  # [n, C, H', W']
        flat = low.reshape(low.shape[0], -1)  # [n, D']
        d, k_total = flat.shape[1], s.total_subspaces
        maps = torch.empty(k_total, d, rank, dtype=torch.float64, device=x.device)
        means = torch.zeros(k_total, d, dtype=torch.float64, device=x.device)
        codes = torch.empty(flat.shape[0], rank, dtype=torch.float64, device=x.device)
        sub = s.subspace_of.to(x.device)
        for k in range(k_total):
            mask = sub == k
            rows = flat[mask]  # [m, D']
            if rows.shape[0] == 0:
                # No image is assigned to this subspace under fixed pairing: a random orthonormal basis.
                g = torch.randn(d, rank, dtype=torch.float64, generator=generator,
                                device=generator.device if generator is not None else "cpu")
                maps[k] = torch.linalg.qr(g)[0].to(x.device)
                continue
            if s.subspace_mean:
                means[k] = rows.mean(0)
            maps[k] = _top_right_singular_vectors(rows - means[k], rank, generator=generator)
            codes[mask] = (rows - means[k]) @ maps[k]  # least squares: M^T (x - mu), orthonormal M
        dtype = _param_dtype(x)
        s.mappers = nn.Parameter(maps.to(dtype))
        s.codes = nn.Parameter(codes.to(dtype))
        if s.subspace_mean:
            s.means = nn.Parameter(means.to(dtype))
        s.subspace_of = sub
        with torch.no_grad():
            err = (s.decode().double() - xd).norm() / xd.norm().clamp_min(1e-300)
        return s, {"relative_reconstruction_error": float(err), "repeated_images": int(repeated)}


def build_synthetic_set(description: dict) -> SyntheticSet:
    """Rebuild an empty set with the right shapes from ``describe()``; then call ``load_state_dict``."""
    d = dict(description)
    kind = d.pop("type", None)
    classes = {"pixel": PixelSet, "lowrank": LowRankSet, "vector": VectorSet}
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
