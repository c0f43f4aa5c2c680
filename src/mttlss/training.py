"""Training and testing fresh networks on tensors in training space: the pieces experts, distillation and
evaluation share.

In the style of torchvision's classification reference, which keeps ``train_one_epoch`` and ``evaluate`` apart
from ``main``: every function here does one thing and knows nothing about artifacts, experts or named recipes.

- the loss: ``label_loss`` for hard labels (int64 [B], cross-entropy) and soft labels (float [B, K]
  probabilities, soft cross-entropy); learnable soft labels are logits, turned into probabilities by
  ``soft_targets`` (softmax, temperature 1), so ``soft_label_loss`` = ``label_loss(logits, soft_targets(z))``;
- ``epoch_batches``: the shuffled mini-batches of one epoch;
- ``train_one_epoch`` / ``evaluate_accuracy``: one pass of SGD (or of GSAM steps around it), top-1 accuracy;
- ``EvalRecipe``: the knobs of one evaluation network (SGD, lr decay, DSA, epoch length); the field's named,
  versioned recipes are the evaluation protocol and live in ``mttlss.evaluate``;
- ``train_and_test``: one seeded network, tested once after its last epoch; ``evaluate_synthetic``: several
  seeded networks (in processes or torchrun ranks), mean +- std. Distillation validates with it on the
  validation split; ``mttlss.evaluate`` tests with it on the test split.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mttlss.augment import DSAConfig, dsa
from mttlss.config import CHOICES
from mttlss.distributed import gather, init_distributed, map_in_processes, shard
from mttlss.errors import UserError
from mttlss.gsam import GSAM
from mttlss.io_utils import atomic_write_json
from mttlss.models import build_model, min_train_batch, model_spec

EPOCH_MODES = CHOICES["eval_epoch_mode"]


class DivergedError(UserError, RuntimeError):
    """A network's training loss became non-finite; the message names the learning rate to lower."""


# --------------------------------------------------------------------------- the label loss


def soft_cross_entropy(logits: Tensor, targets_prob: Tensor) -> Tensor:
    """-(1/B) sum_i sum_k p_ik log softmax(z_i)_k  (DATM's evaluation loss; p = softmax of the learned logits)."""
    return -(targets_prob * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def soft_targets(label_logits: Tensor) -> Tensor:
    """Learnable soft labels [B, K] (logits) -> the probabilities a network is trained towards (temperature 1)."""
    return F.softmax(label_logits, dim=1)


def label_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The one training loss: int64 [B] class indices -> cross-entropy; float [B, K] probabilities -> soft CE."""
    if targets.dtype.is_floating_point:
        return soft_cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets)


def soft_label_loss(logits: Tensor, target_logits: Tensor) -> Tensor:
    """``label_loss`` against softmax(label logits) [B, K]: DATM's loss for learnable soft labels."""
    return label_loss(logits, soft_targets(target_logits))


# --------------------------------------------------------------------------- one epoch, accuracy


def epoch_batches(n: int, *, batch_size: int, steps: int | None, generator: torch.Generator,
                  min_batch: int = 1) -> list[Tensor]:
    """Shuffled mini-batch indices: one pass over ``n`` images (``steps=None``; the last batch may be smaller, and
    joins the one before it when smaller than ``min_batch``: ``models.min_train_batch``, 2 for BatchNorm), or
    ``steps`` full batches cut from a stream of fresh permutations (budget mode), so every image is seen
    before any is repeated.

    What differs from ``matching.batch_schedule``: there a batch never spans two permutations (the tail of a
    permutation too short for a batch is skipped); here batches run on across permutation boundaries.
    """
    if steps is None:
        sizes = _pass_sizes(n, batch_size=batch_size, min_batch=min_batch)
        return list(torch.randperm(n, generator=generator).split(sizes))
    batch = min(batch_size, n)
    need = steps * batch
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))]
    return list(torch.cat(perms)[:need].split(batch))


def _pass_sizes(n: int, *, batch_size: int, min_batch: int) -> list[int]:
    """Batch sizes of one full pass over ``n`` images: full batches, then the rest, which joins the batch before it
    when smaller than ``min_batch``."""
    full, rest = divmod(n, batch_size)
    sizes = [batch_size] * full + ([rest] if rest else [])
    if len(sizes) > 1 and rest and rest < min_batch:
        sizes[-2:] = [batch_size + rest]
    return sizes


def decoded_batch_count(n: int, *, batch_size: int, min_batch: int = 1) -> int:
    """Batches in one full pass over ``n`` images (``epoch_batches`` with ``steps=None``)."""
    return len(_pass_sizes(n, batch_size=batch_size, min_batch=min_batch))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | GSAM,  # GSAM: two forward/backward passes per batch, on the same batch
    *,
    x: Tensor,  # [N, C, H, W], training space, already on the model's device
    targets: Tensor,  # int64 [N] (CE) or float [N, K] probabilities (soft CE)
    batch_size: int,
    dsa_config: DSAConfig | None,
    generator: torch.Generator,  # CPU generator: shuffling (and DSA when dsa_generator is None)
    steps: int | None = None,  # None: one full pass; else exactly this many batches (budget mode)
    dsa_generator: torch.Generator | None = None,  # CPU generator for DSA draws (augment.dsa needs CPU)
    bf16: bool = False,  # bf16 autocast for forward/backward (the fast path; parameters stay float32)
    channels_last: bool = False,
) -> float:
    """One epoch of SGD (or GSAM); returns the mean training loss over the batches (at the weights before each step)."""
    model.train()
    total, count = torch.zeros((), device=x.device), 0
    batches = epoch_batches(x.shape[0], batch_size=batch_size, steps=steps, generator=generator,
                            min_batch=min_train_batch(model))
    for idx in batches:
        idx = idx.to(x.device)
        xb, tb = x[idx], targets[idx]
        if dsa_config is not None:
            xb = dsa(xb, config=dsa_config, generator=dsa_generator or generator)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = _step(model, optimizer, xb=xb, tb=tb, bf16=bf16)
        total += loss.detach()
        count += 1
    return float(total) / max(count, 1)  # one host sync per epoch, not per batch


def _step(model: nn.Module, optimizer: torch.optim.Optimizer | GSAM, *, xb: Tensor, tb: Tensor, bf16: bool) -> Tensor:
    """One optimiser step on the batch ``xb`` [B, C, H, W] / ``tb``; returns the loss before the step."""
    def batch_loss() -> Tensor:
        with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=bf16):
            return label_loss(model(xb), tb)

    if isinstance(optimizer, GSAM):
        return optimizer.step(batch_loss)
    loss = batch_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode, so BatchNorm uses running statistics)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        correct += int((model(xb.to(device)).argmax(dim=1) == yb.to(device)).sum())
    return correct / max(int(y.shape[0]), 1)


# --------------------------------------------------------------------------- the recipe of one network


def check_lr(lr: float, *, where: str = "evaluation") -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(
            f"{where}: learning rate {lr} must be finite and > 0; pass lr=... or a recipe with a fixed lr "
            f"(e.g. get_recipe('mtt-1000', lr=0.01)), or check the artifact's learned lr"
        )
    return lr


@dataclass(frozen=True, kw_only=True)
class EvalRecipe:
    """How one fresh evaluation network is trained; every knob is written into the results."""

    name: str = "mtt-1000"
    epochs: int = 1000  # training epochs (see epoch_mode)
    batch_size: int = 256  # MTT 256; DATM 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr: float | None = None  # None -> the artifact's learned step size alpha
    lr_decay_at: float = 0.5  # multiply by lr_decay at this fraction of the epochs (MTT: x0.1 at half)
    lr_decay: float = 0.1
    dsa: bool = True  # DSA on every training batch, never at test time
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    # "decoded": an epoch is a full pass over the decoded set.
    # "budget": an epoch is ceil(IPC x classes / batch) optimiser steps, the cost of one epoch of a pixel
    #  baseline with the same storage (method.md 11.2 (b)); the decoded set is cycled in shuffled batches.
    # "repaired": HaBa's practice (method.md 11.2 (c)), low-rank sets (lowrank or vector) with pairing=random only:
    #  an epoch is a full pass over the n stored codes, and before each epoch every code is decoded afresh with a
    #  mapper drawn at random (of its own class under per-class subspaces); a code keeps its label.
    epoch_mode: str = "decoded"

    def __post_init__(self) -> None:
        if self.epoch_mode not in EPOCH_MODES:
            raise ValueError(f"epoch_mode={self.epoch_mode!r}; use one of {EPOCH_MODES}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs ({self.epochs}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0.0 <= self.lr_decay_at <= 1.0:
            raise ValueError(f"lr_decay_at={self.lr_decay_at} must be a fraction in [0, 1]")
        if self.lr is not None:
            check_lr(self.lr, where=f"recipe {self.name!r}")

    @property
    def decay_epoch(self) -> int:
        """The epoch index from which the lr is multiplied by ``lr_decay``."""
        return round(self.lr_decay_at * self.epochs)


def _require_recipe(recipe: Any) -> EvalRecipe:
    if not isinstance(recipe, EvalRecipe):
        raise TypeError(f"recipe={recipe!r} is not an EvalRecipe; for a named recipe pass "
                        f"mttlss.evaluate.get_recipe({recipe!r})")
    return recipe


# The sets epoch_mode="repaired" can re-pair: both low-rank forms pair codes with subspaces (``subspaces_for``).
REPAIRABLE = ("lowrank", "vector")


class EpochModeError(UserError):
    """An epoch mode the synthetic set cannot be evaluated in; the message names the fix."""


def check_epoch_mode(recipe: EvalRecipe, *, synthetic: Any) -> None:
    """Refuse ``epoch_mode="repaired"`` unless ``synthetic`` is a low-rank set (form A or B) with pairing=random."""
    if recipe.epoch_mode != "repaired":
        return
    kind, pairing = getattr(synthetic, "kind", None), getattr(synthetic, "pairing", None)
    if kind not in REPAIRABLE or pairing != "random":
        what = "no synthetic set" if synthetic is None else f"a {kind} set" + (f" with pairing={pairing}" if pairing else "")
        raise EpochModeError(
            f"epoch_mode 'repaired' re-pairs codes with mappers each epoch, so it needs a low-rank set with "
            f"pairing=random (param lowrank or vector), not {what}; evaluate this set with epoch mode 'decoded' or 'budget' "
            f"(--epoch-mode decoded), or distil it with --set pairing=random")


def pairing_generator(seed: int) -> torch.Generator:
    """The CPU stream of one network's per-epoch pairings in epoch_mode="repaired": seeded with ``seed + 2``
    (shuffling uses ``seed``, DSA ``seed + 1``), so the pairings are the same for the same network seed."""
    return torch.Generator().manual_seed(seed + 2)


def repaired_images(synthetic: Any, *, generator: torch.Generator) -> Tensor:
    """One epoch's training images [n, C, H, W], training space, detached: every stored code decoded with a
    subspace drawn afresh from ``generator`` (``subspaces_for`` of a low-rank set: one of its own class's under
    per-class subspaces). Row i is code i, so row i keeps label i."""
    with torch.no_grad():
        return synthetic.decode(generator=generator).detach()


def budget_steps_per_epoch(*, ipc: int, num_classes: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of a pixel baseline storing ``ipc`` images per class."""
    return math.ceil(ipc * num_classes / batch_size)


def _dsa_config(recipe: EvalRecipe) -> DSAConfig | None:
    return DSAConfig(strategy=recipe.dsa_strategy) if recipe.dsa else None


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_finite(loss: float, *, seed: int, epoch: int, recipe: EvalRecipe, lr: float) -> None:
    if not math.isfinite(loss):
        raise DivergedError(
            f"non-finite training loss ({loss}) in evaluation run seed={seed}, epoch {epoch + 1}/"
            f"{recipe.epochs} at lr {lr:.4g}; try a lower lr "
            f"(recipe lr=..., e.g. get_recipe({recipe.name!r}, lr=0.01))"
        )


def train_and_test(
    *,
    x_train: Tensor,  # [N, C, H, W], training space
    targets: Tensor,  # int64 [N] or float [N, K] probabilities
    x_test: Tensor,  # [M, C, H, W], training space (same preprocessing as x_train)
    y_test: Tensor,  # int64 [M]
    model_spec: dict | str,
    num_classes: int,
    recipe: EvalRecipe,
    lr: float,
    seed: int,
    device: str = "cpu",
    steps_per_epoch: int | None = None,  # None: "decoded" epochs (full passes); else budget-mode steps
    return_model: bool = False,
    synthetic: Any = None,  # epoch_mode="repaired": the LowRankSet / VectorSet (pairing=random) re-decoded each epoch
) -> dict:
    """Train one fresh network seeded with ``seed`` and test it once, after the last epoch.

    With ``synthetic`` (epoch_mode="repaired"), ``x_train`` gives only the image shape: each epoch trains on
    ``repaired_images`` of the set, drawn from ``pairing_generator(seed)``, one full pass over its n codes."""
    recipe = _require_recipe(recipe)
    check_epoch_mode(recipe, synthetic=synthetic)
    repaired = recipe.epoch_mode == "repaired"
    pair_gen = pairing_generator(seed) if repaired else None
    lr = check_lr(lr, where=f"seed {seed}")
    torch.manual_seed(seed)  # network initialisation
    shuffle_gen = torch.Generator().manual_seed(seed)
    # A second CPU stream for augmentation, so the shuffling order does not depend on whether DSA is on.
    dsa_gen = torch.Generator().manual_seed(seed + 1)
    model = build_model(model_spec, channels=x_train.shape[1], num_classes=num_classes,
                        image_size=tuple(x_train.shape[2:])).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    x, t = x_train.to(device), targets.to(device)  # moved once; batches are indexed in place
    dsa_config = _dsa_config(recipe)
    loss, steps, start = float("nan"), 0, time.perf_counter()
    for epoch in range(recipe.epochs):
        if epoch == recipe.decay_epoch and recipe.lr_decay_at < 1.0:
            _set_lr(optimizer, lr * recipe.lr_decay)
        if repaired:
            x = repaired_images(synthetic, generator=pair_gen).to(device)
        loss = train_one_epoch(model, optimizer, x=x, targets=t, batch_size=recipe.batch_size, dsa_config=dsa_config,
                               generator=shuffle_gen, steps=steps_per_epoch, dsa_generator=dsa_gen)
        steps += steps_per_epoch or decoded_batch_count(x.shape[0], batch_size=recipe.batch_size,
                                                        min_batch=min_train_batch(model))
        _check_finite(loss, seed=seed, epoch=epoch, recipe=recipe, lr=optimizer.param_groups[0]["lr"])
    result = {
        "seed": seed,
        "test_acc": evaluate_accuracy(model, x_test, y_test),
        "final_train_loss": loss,
        "epochs": recipe.epochs,
        "steps": steps,
        "final_lr": optimizer.param_groups[0]["lr"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if return_model:
        result["model"] = model
    return result


# --------------------------------------------------------------------------- several networks


def _kept_file(keep: str | Path, seed: int) -> Path:
    return Path(keep) / f"seed_{seed}.json"


def _run_one(job: dict) -> dict:
    """Module-level so ``map_in_processes`` can pickle it. With ``job["keep"]`` (a folder), the finished
    network's result is written there at once, so an interrupted evaluation loses only the networks in training."""
    job = dict(job)
    keep = job.pop("keep", None)
    result = train_and_test(**job)
    if keep is not None:
        atomic_write_json(_kept_file(keep, result["seed"]), result)
    return result


def _load_kept(jobs: list[dict], keep: str | Path | None) -> dict[int, dict]:
    """The results of the networks an earlier, interrupted run of the same evaluation finished, by seed."""
    done = {}
    for job in jobs if keep is not None else []:
        path = _kept_file(keep, job["seed"])
        try:
            done[job["seed"]] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # not there (or unreadable): that network is trained again
            continue
    return done


def _run_seeds(jobs: list[dict], *, workers: int, keep: str | Path | None = None) -> list[dict]:
    info = init_distributed()
    done = _load_kept(jobs, keep)
    todo = [dict(job, keep=None if keep is None else str(keep)) for job in jobs if job["seed"] not in done]
    if done and info.is_main:
        print(f"evaluate: resuming: kept {len(done)} of {len(jobs)} finished networks (seeds {sorted(done)}) from "
              f"{keep}; training the other {len(todo)}", file=sys.stderr)
    if info.world_size > 1:  # torchrun: each rank trains its share of the seeds on its own device
        mine = [dict(job, device=info.device) for job in shard(todo, info)]
        runs = [r for part in gather([_run_one(j) for j in mine], info) for r in part]
    else:
        runs = map_in_processes(_run_one, todo, workers=workers)
    return sorted([*done.values(), *runs], key=lambda r: r["seed"])


def _mean_std(accs: list[float]) -> tuple[float, float]:
    # population std (ddof 0), as np.std in MTT/DATM's "mean = ... std = ..." lines
    mean = sum(accs) / len(accs)
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))


def _resolve_spec(model: dict | str) -> dict:
    return model_spec(model) if isinstance(model, str) else dict(model)


def _steps_per_epoch(recipe: EvalRecipe, *, ipc: int | None, num_classes: int) -> int | None:
    if recipe.epoch_mode != "budget":
        return None
    if ipc is None:
        raise ValueError("epoch_mode='budget' needs ipc=... (the storage budget per class)")
    return budget_steps_per_epoch(ipc=ipc, num_classes=num_classes, batch_size=recipe.batch_size)


def evaluate_synthetic(
    *,
    images: Tensor,  # [n, C, H, W], training space
    targets: Tensor,  # int64 [n] or float [n, K] probabilities
    x_test: Tensor,  # [M, C, H, W], training space
    y_test: Tensor,
    model_spec: dict | str,
    num_classes: int,
    lr: float | None,
    recipe: EvalRecipe,
    runs: int = 5,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 1,
    ipc: int | None = None,  # storage budget per class; needed for epoch_mode="budget"
    eval_split: str = "test",  # recorded only: which split x_test/y_test really are ("val" for selection)
    keep: str | Path | None = None,  # a folder: each finished network's result is kept there, and reused on a rerun
    synthetic: Any = None,  # the set ``images`` decode from; needed (low-rank, pairing=random) for "repaired"
) -> dict:
    """Train ``runs`` networks (seeds ``seed .. seed+runs-1``) on the synthetic set; per-seed and mean +- std.

    ``keep``: resumable. The caller names a folder that only this evaluation (same images, targets, test data,
    recipe, model, device) writes to; a rerun trains only the seeds without a result there.

    epoch_mode="repaired": each network re-decodes ``synthetic`` before every epoch (``train_and_test``); ``images``
    (its fixed-pairing decode, [n, C, H, W]) and ``targets`` still give n and the shapes."""
    recipe = _require_recipe(recipe)
    check_epoch_mode(recipe, synthetic=synthetic)
    repaired = recipe.epoch_mode == "repaired"
    lr_source = "recipe" if recipe.lr is not None else "given"
    lr = check_lr(recipe.lr if recipe.lr is not None else (lr if lr is not None else float("nan")),
                  where=f"recipe {recipe.name!r}")
    if runs < 1:
        raise ValueError(f"runs={runs}; evaluate at least one network")
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} labels; they must pair one to one")
    if repaired and synthetic.num_images != targets.shape[0]:
        raise ValueError(f"{synthetic.num_images} codes but {targets.shape[0]} labels; pass the labels of this set")
    steps_per_epoch = _steps_per_epoch(recipe, ipc=ipc, num_classes=num_classes)
    spec = _resolve_spec(model_spec)
    jobs = [dict(x_train=images, targets=targets, x_test=x_test, y_test=y_test, model_spec=spec,
                 num_classes=num_classes, recipe=recipe, lr=lr, seed=seed + i, device=device,
                 steps_per_epoch=steps_per_epoch, **({"synthetic": synthetic} if repaired else {}))
            for i in range(runs)]
    per_run = _run_seeds(jobs, workers=workers, keep=keep)
    accs = [r["test_acc"] for r in per_run]
    mean, std = _mean_std(accs)
    result = {
        "recipe": {**asdict(recipe), "lr": lr, "lr_source": lr_source, "steps_per_epoch": steps_per_epoch,
                   "labels": "soft" if targets.dtype.is_floating_point else "hard"},
        "model": spec,
        "runs": per_run,
        "accs": accs,
        "mean": mean,
        "std": std,
        "n_train": int(images.shape[0]),
        "ipc": ipc,
        "select_on": "none",
        "eval_split": eval_split,
    }
    if repaired:
        result["repairing"] = _repairing_record(synthetic)
    return result


def _repairing_record(synthetic: Any) -> dict:
    """What "repaired" epochs drew from: the codes per epoch, and the mappers a code may meet."""
    per_class = synthetic.subspaces == "per_class"
    return {"images_per_epoch": int(synthetic.num_images), "subspaces": synthetic.subspaces,
            "mappers_per_code": int(synthetic.num_subspaces), "own_class_only": per_class,
            "pairing_seed": "network seed + 2"}
