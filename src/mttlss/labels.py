"""Labels of the synthetic set: hard class indices, or learnable soft labels (logits) as in DATM.

Soft labels are stored as logits [n, classes]; the training target is softmax(logits) (temperature 1: a chosen
temperature is folded into the stored logits). Where they start (method.md section 6, computed on the *decoded*
initial images) is class-faithful: every initial label has its maximum at the image's own class.

- ``label_init="experts"``: the mean of the experts' final-checkpoint logits over the experts that classify the
  image as its class (DATM), or over all experts when none does (DATM's formula would divide by zero there);
  where the mean does not put the own class strictly on top (no expert was right), its logit is raised to
  ``RAISE_MARGIN`` above the largest other. Then divided by a temperature T (``TEMPERATURES``).
- ``label_init="onehot"``: the own class at probability c (``CONFIDENCES``), the rest shared evenly.

Why raise the own class: with weak experts most images have no correct expert, and the all-experts mean then
names another class (measured: 36 % agreement on 100 classes, issue 11); such a label teaches the wrong class.

How soft labels are stored (``label_dtype``, ``label_topk``; method.md section 6): ``encode_labels`` gives the
artifact's tensors, ``decode_labels`` the logits back, and ``compact_labels`` is the two in a row, so what a run
validates on is what its artifact holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from mttlss.config import CHOICES
from mttlss.models import ParamLayout

# the candidates the start chooses among on the validation split (each costs one validation training); the
# first is the one used when there is nothing to choose on
TEMPERATURES = (1.0, 0.5, 0.25)   # 1: the experts' own sharpness (DATM); lower: sharper
CONFIDENCES = (0.6, 0.9)          # one-hot labels smoothed to this probability of the own class
# logits, before the temperature: the own class ends e^1 = 2.7x as likely as the runner-up where it was raised
RAISE_MARGIN = 1.0
# the artifact's names of stored soft labels: all classes' logits, or the top k as log-probabilities + class indices
STORED_LABELS = ("labels", "labels_topk_values", "labels_topk_index")
_INDEX_DTYPE = torch.int16  # 2 bytes per kept class: up to 32,768 classes


@torch.no_grad()
def expert_logits(model: nn.Module, layout: ParamLayout, *, params: torch.Tensor, x: torch.Tensor,
                  batch_size: int = 512) -> torch.Tensor:
    """Logits [n, classes] of the network with flat parameters ``params`` [P] on ``x`` [n, C, H, W] (training space)."""
    named = layout.unflatten(params.to(x.device))
    out = [functional_call(model, named, (x[i : i + batch_size],)) for i in range(0, len(x), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def experts_mean_logits(model: nn.Module, layout: ParamLayout, *, final_params: list[torch.Tensor], x: torch.Tensor,
                        y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DATM's mean logits [n, classes] for images ``x`` (training space) of classes ``y`` [n]: over the experts
    that classify each image as its class, else over all experts; and how many experts were right, [n]."""
    y = y.to(x.device)
    correct_sum = all_sum = None
    hits = torch.zeros(len(x), device=x.device)
    for params in final_params:
        logits = expert_logits(model, layout, params=params, x=x).float()
        correct = (logits.argmax(1) == y).float()
        correct_sum = logits * correct[:, None] if correct_sum is None else correct_sum + logits * correct[:, None]
        all_sum = logits.clone() if all_sum is None else all_sum + logits
        hits += correct
    mean_correct = correct_sum / hits.clamp(min=1)[:, None]
    return torch.where(hits[:, None] > 0, mean_correct, all_sum / len(final_params)), hits


def raise_own_class(logits: torch.Tensor, y: torch.Tensor, *, margin: float = RAISE_MARGIN) -> torch.Tensor:
    """``logits`` [n, classes] with, where class ``y`` [n] is not the unique argmax, its logit set to ``margin``
    above the largest other (a copy; rows already on their class are unchanged)."""
    y = y.to(logits.device)
    others = logits.scatter(1, y[:, None], float("-inf"))            # [n, classes] without the own class
    runner_up = others.max(1).values                                  # [n]
    own = logits.gather(1, y[:, None]).squeeze(1)                     # [n]
    out = logits.clone()
    wrong = own <= runner_up                                          # a tie counts: argmax could pick the other
    out[wrong, y[wrong]] = runner_up[wrong] + margin
    return out


@torch.no_grad()
def init_soft_labels(model: nn.Module, layout: ParamLayout, *, final_params: list[torch.Tensor], x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """Class-faithful initial logits [n, classes] at temperature 1: DATM's mean, own class raised where needed."""
    mean, _ = experts_mean_logits(model, layout, final_params=final_params, x=x, y=y)
    return raise_own_class(mean, y)


def onehot_logits(y: torch.Tensor, *, num_classes: int, confidence: float) -> torch.Tensor:
    """Logits [n, classes] whose softmax puts ``confidence`` on class ``y`` [n] and the rest evenly on the others."""
    if not 1.0 / num_classes < confidence < 1.0:
        raise ValueError(f"label_confidence={confidence} must lie in (1/classes, 1) = ({1.0 / num_classes:.3g}, 1): "
                         f"at or below 1/classes the own class is not the most likely one")
    own = math.log(confidence * (num_classes - 1) / (1.0 - confidence))  # others at logit 0
    return torch.nn.functional.one_hot(y.long(), num_classes).float() * own


def label_candidates(*, label_init: str, base: torch.Tensor | None, y: torch.Tensor, num_classes: int,
                     value: float | None) -> list[tuple[float, torch.Tensor]]:
    """(temperature or confidence, logits [n, classes]) to choose the start among: ``value`` alone when fixed.

    ``base`` [n, classes]: ``init_soft_labels``' logits (``label_init="experts"``; unused for "onehot")."""
    if label_init == "experts":
        temps = TEMPERATURES if value is None else (value,)
        return [(t, base / t) for t in temps]
    confidences = CONFIDENCES if value is None else (value,)
    return [(c, onehot_logits(y, num_classes=num_classes, confidence=c).to(y.device)) for c in confidences]


@torch.no_grad()
def label_stats(labels: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """How well labels carry the class: agreement (argmax = class), mean largest probability and mean probability
    of the own class. ``labels``: logits [n, classes] (softmax at temperature 1) or hard [n] (one-hot targets);
    ``y`` [n]: each image's class."""
    y = y.to(labels.device).long()
    if not labels.is_floating_point():
        agree = float((labels == y).float().mean())
        return {"agreement": agree, "mean_max_prob": 1.0, "mean_own_prob": agree}
    p = torch.softmax(labels.detach().float(), dim=1)
    return {"agreement": float((p.argmax(1) == y).float().mean()), "mean_max_prob": float(p.max(1).values.mean()),
            "mean_own_prob": float(p.gather(1, y[:, None]).mean())}


# ---------------------------------------------------------------------------------------------------------
# storage


def check_label_storage(*, num_classes: int, dtype: str, topk: int | None) -> None:
    """Raise ValueError, naming the fix, when soft labels of ``num_classes`` classes cannot be stored so."""
    if dtype not in CHOICES["label_dtype"]:
        raise ValueError(f"label_dtype={dtype!r} is not one of {', '.join(map(repr, CHOICES['label_dtype']))}")
    limit = min(num_classes, torch.iinfo(_INDEX_DTYPE).max + 1)
    if topk is not None and not 1 <= topk <= limit:
        why = f"the {num_classes} classes" if limit == num_classes else "int16 class indices"
        raise ValueError(f"label_topk={topk} must lie in 1..{limit} ({why}); set it in that range, or null to store "
                         f"every class")


def stored_label_bytes(*, num_classes: int, dtype: str = "float32", topk: int | None = None) -> int:
    """Bytes one image's soft label takes in the artifact: classes values, or k values plus k int16 indices."""
    check_label_storage(num_classes=num_classes, dtype=dtype, topk=topk)
    value = torch.finfo(getattr(torch, dtype)).bits // 8
    if topk is None:
        return num_classes * value
    return topk * (value + torch.iinfo(_INDEX_DTYPE).bits // 8)


def stored_label_floats(*, num_classes: int, dtype: str = "float32", topk: int | None = None) -> float:
    """One image's stored soft label in float32-equivalents (bytes / 4: a float16 value or an int16 index is 0.5),
    the unit the storage budget counts in."""
    return stored_label_bytes(num_classes=num_classes, dtype=dtype, topk=topk) / 4


def _round_down(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, rounded toward -inf: stored log-probabilities never exceed the true ones, so the
    mass left for the other classes on load is never negative."""
    out = values.to(dtype)
    return torch.where(out.float() > values, torch.nextafter(out, torch.full_like(out, float("-inf"))), out)


@torch.no_grad()
def encode_labels(logits: torch.Tensor, *, dtype: str = "float32", topk: int | None = None) -> dict[str, torch.Tensor]:
    """The artifact's tensors for soft labels ``logits`` [n, classes], on the CPU as the file holds them.

    ``topk`` None: ``"labels"`` [n, classes], the logits in ``dtype`` (float16: shifted so each row's largest is
    0, where float16 is finest; softmax ignores the shift). ``topk`` k: ``"labels_topk_values"`` [n, k], the k
    largest log-probabilities in ``dtype`` (rounded down), and ``"labels_topk_index"`` [n, k] int16, their classes."""
    check_label_storage(num_classes=logits.shape[1], dtype=dtype, topk=topk)
    logits = logits.detach().float().cpu()
    if topk is None:
        if dtype == "float32":
            return {"labels": logits.clone()}  # as the learnable logits are: no change at all (a copy, not a view)
        return {"labels": (logits - logits.max(1, keepdim=True).values).to(getattr(torch, dtype))}
    values, index = torch.log_softmax(logits, dim=1).topk(topk, dim=1)
    return {"labels_topk_values": _round_down(values, getattr(torch, dtype)), "labels_topk_index": index.to(_INDEX_DTYPE)}


def decode_labels(stored: dict[str, torch.Tensor], *, num_classes: int) -> torch.Tensor:
    """Float32 logits [n, classes] from ``encode_labels``' tensors. Top-k: the mass the k classes leave is spread
    evenly over the other classes, so the softmax gives each kept class exactly its stored probability."""
    if "labels_topk_values" not in stored:
        return stored["labels"].float()
    values = stored["labels_topk_values"].float()               # [n, k] log-probabilities
    index = stored["labels_topk_index"].long()                  # [n, k] classes
    others = max(num_classes - values.shape[1], 1)              # k = classes leaves none: every column is set below
    rest = (1.0 - values.exp().sum(1)).clamp_min(torch.finfo(torch.float32).tiny) / others  # [n] each other class
    out = rest.log()[:, None].repeat(1, num_classes)
    return out.scatter(1, index, values)


def compact_labels(logits: torch.Tensor, *, dtype: str = "float32", topk: int | None = None) -> torch.Tensor:
    """Logits [n, classes] float32, on ``logits``' device: exactly what an artifact stores of ``logits`` and loads
    back (identity for float32 and every class)."""
    stored = encode_labels(logits, dtype=dtype, topk=topk)
    return decode_labels(stored, num_classes=logits.shape[1]).to(logits.device)
