"""Evaluation protocol (method.md section 11): train fresh networks on a synthetic set, test once.

The recipe is the MTT/DATM one: a fresh ConvNet, SGD (momentum 0.9, weight decay 5e-4) at the learned
step size alpha, x0.1 at half of the epochs, DSA on every training batch, cross-entropy for hard labels and
soft cross-entropy on softmax(logits) for soft labels; the network is tested once, after the last epoch,
and the result is mean +- std over several explicitly seeded networks. Nothing here looks at test accuracy
to choose anything (``select_on: "none"``); model selection goes through ``split="val"``.

Small pieces in the style of torchvision's references: ``train_one_epoch`` / ``evaluate_accuracy`` do one
thing each, ``train_and_test`` is one network, ``evaluate_synthetic`` is several networks (in processes or
torchrun ranks), and ``evaluate_artifact`` wires an artifact directory to all of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPOCH_MODES = ("decoded", "budget")


def check_lr(lr: float, *, where: str = "evaluation") -> float:
    lr = float(lr)
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(
            f"{where}: learning rate {lr} must be finite and > 0; pass lr=... or a recipe with a fixed lr "
            f"(e.g. get_recipe('mtt-1000', lr=0.01)), or check the artifact's learned lr"
        )
    return lr


@dataclass(frozen=True)
class EvalRecipe:
    """One named, versioned evaluation recipe; every knob is written into the results."""

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


RECIPES: dict[str, EvalRecipe] = {
    "mtt-1000": EvalRecipe(name="mtt-1000"),
    "datm-1000": EvalRecipe(name="datm-1000", batch_size=128),
    "fast-300": EvalRecipe(name="fast-300", epochs=300),
    "quick-100": EvalRecipe(name="quick-100", epochs=100),
    # The full-data upper bound: real images have no learned alpha, so the lr is fixed.
    "full-30": EvalRecipe(name="full-30", epochs=30, lr=0.01),
}


def get_recipe(name: str, **overrides: Any) -> EvalRecipe:
    """The recipe called ``name``, with fields replaced by ``overrides`` (validated again)."""
    if name not in RECIPES:
        raise ValueError(f"unknown evaluation recipe {name!r}; choose one of {sorted(RECIPES)}")
    unknown = set(overrides) - set(EvalRecipe.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown recipe field(s) {sorted(unknown)}; fields are {list(EvalRecipe.__dataclass_fields__)}")
    return replace(RECIPES[name], **overrides)


def _as_recipe(recipe: str | EvalRecipe) -> EvalRecipe:
    return get_recipe(recipe) if isinstance(recipe, str) else recipe


# --------------------------------------------------------------------------- losses and loops


def soft_cross_entropy(logits: Tensor, targets_prob: Tensor) -> Tensor:
    """-(1/B) sum_i sum_k p_ik log softmax(z_i)_k  (DATM's evaluation loss; p = softmax of the learned logits)."""
    return -(targets_prob * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    # int64 [B] -> hard labels; float [B, K] -> probabilities
    if targets.dtype.is_floating_point:
        return soft_cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets)


def _batch_indices(n: int, batch_size: int, steps: int | None, generator: torch.Generator) -> list[Tensor]:
    """Shuffled mini-batch indices: one pass (``steps=None``), or ``steps`` full batches cycling over
    fresh permutations (budget mode), so every image is seen before any is repeated."""
    if steps is None:
        return list(torch.randperm(n, generator=generator).split(batch_size))
    batch = min(batch_size, n)
    need = steps * batch
    perms = [torch.randperm(n, generator=generator) for _ in range(math.ceil(need / n))]
    return list(torch.cat(perms)[:need].split(batch))


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,  # [N, C, H, W], training space, already on the model's device
    targets: Tensor,  # int64 [N] (CE) or float [N, K] probabilities (soft CE)
    *,
    batch_size: int,
    dsa_config: Any | None,
    generator: torch.Generator,  # CPU generator: shuffling (and DSA when dsa_generator is None)
    steps: int | None = None,  # None: one full pass; else exactly this many batches (budget mode)
    dsa_generator: torch.Generator | None = None,  # CPU generator for DSA draws (augment.dsa needs CPU)
    bf16: bool = False,  # bf16 autocast for forward/backward (the fast path; parameters stay float32)
    channels_last: bool = False,
) -> float:
    """One epoch of SGD; returns the mean training loss over the batches."""
    model.train()
    if dsa_config is not None:
        from mttlss.augment import dsa
    total, count = torch.zeros((), device=x.device), 0
    for idx in _batch_indices(x.shape[0], batch_size, steps, generator):
        idx = idx.to(x.device)
        xb, tb = x[idx], targets[idx]
        if dsa_config is not None:
            xb = dsa(xb, config=dsa_config, generator=dsa_generator or generator)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(model(xb), tb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
        count += 1
    return float(total) / max(count, 1)  # one host sync per epoch, not per batch


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode, so BatchNorm uses running statistics)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        correct += int((model(xb.to(device)).argmax(dim=1) == yb.to(device)).sum())
    return correct / max(int(y.shape[0]), 1)


def budget_steps_per_epoch(*, ipc: int, num_classes: int, batch_size: int) -> int:
    """Optimiser steps in one epoch of a pixel baseline storing ``ipc`` images per class."""
    return math.ceil(ipc * num_classes / batch_size)


def _dsa_config(recipe: EvalRecipe) -> Any | None:
    if not recipe.dsa:
        return None
    from mttlss.augment import DSAConfig

    return DSAConfig(strategy=recipe.dsa_strategy)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_and_test(
    *,
    x_train: Tensor,  # [N, C, H, W], training space
    targets: Tensor,  # int64 [N] or float [N, K] probabilities
    x_test: Tensor,  # [M, C, H, W], training space (same preprocessing as x_train)
    y_test: Tensor,  # int64 [M]
    model_spec: dict | str,
    num_classes: int,
    recipe: EvalRecipe | str,
    lr: float,
    seed: int,
    device: str = "cpu",
    steps_per_epoch: int | None = None,  # None: "decoded" epochs (full passes); else budget-mode steps
    return_model: bool = False,
) -> dict:
    """Train one fresh network seeded with ``seed`` and test it once, after the last epoch."""
    from mttlss.models import build_model

    recipe = _as_recipe(recipe)
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
        loss = train_one_epoch(model, optimizer, x, t, batch_size=recipe.batch_size, dsa_config=dsa_config,
                               generator=shuffle_gen, steps=steps_per_epoch, dsa_generator=dsa_gen)
        steps += steps_per_epoch or math.ceil(x.shape[0] / recipe.batch_size)
        if not math.isfinite(loss):
            raise RuntimeError(
                f"non-finite training loss ({loss}) in evaluation run seed={seed}, epoch {epoch + 1}/"
                f"{recipe.epochs} at lr {optimizer.param_groups[0]['lr']:.4g}; try a lower lr "
                f"(recipe lr=..., e.g. get_recipe({recipe.name!r}, lr=0.01))"
            )
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


def _run_one(job: dict) -> dict:
    """Module-level so ``map_in_processes`` can pickle it."""
    return train_and_test(**job)


def _run_seeds(jobs: list[dict], *, workers: int) -> list[dict]:
    from mttlss.distributed import gather, init_distributed, map_in_processes, shard

    info = init_distributed()
    if info.world_size > 1:  # torchrun: each rank trains its share of the seeds on its own device
        mine = [dict(job, device=info.device) for job in shard(jobs, info)]
        runs = [r for part in gather([_run_one(j) for j in mine], info) for r in part]
    else:
        runs = map_in_processes(_run_one, jobs, workers=workers)
    return sorted(runs, key=lambda r: r["seed"])


def _mean_std(accs: list[float]) -> tuple[float, float]:
    # population std (ddof 0), as np.std in MTT/DATM's "mean = ... std = ..." lines
    mean = sum(accs) / len(accs)
    return mean, math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))


def evaluate_synthetic(
    *,
    images: Tensor,  # [n, C, H, W], training space
    targets: Tensor,  # int64 [n] or float [n, K] probabilities
    x_test: Tensor,  # [M, C, H, W], training space
    y_test: Tensor,
    model_spec: dict | str,
    num_classes: int,
    lr: float | None,
    recipe: EvalRecipe | str,
    runs: int = 5,
    seed: int = 0,
    device: str = "cpu",
    workers: int = 1,
    ipc: int | None = None,  # storage budget per class; needed for epoch_mode="budget"
    eval_split: str = "test",  # recorded only: which split x_test/y_test really are ("val" for selection)
) -> dict:
    """Train ``runs`` networks (seeds ``seed .. seed+runs-1``) on the synthetic set; per-seed and mean +- std."""
    recipe = _as_recipe(recipe)
    lr_source = "recipe" if recipe.lr is not None else "given"
    lr = check_lr(recipe.lr if recipe.lr is not None else (lr if lr is not None else float("nan")),
                  where=f"recipe {recipe.name!r}")
    if runs < 1:
        raise ValueError(f"runs={runs}; evaluate at least one network")
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} labels; they must pair one to one")
    steps_per_epoch = None
    if recipe.epoch_mode == "budget":
        if ipc is None:
            raise ValueError("epoch_mode='budget' needs ipc=... (the storage budget per class)")
        steps_per_epoch = budget_steps_per_epoch(ipc=ipc, num_classes=num_classes, batch_size=recipe.batch_size)
    spec = _resolve_spec(model_spec)
    jobs = [dict(x_train=images, targets=targets, x_test=x_test, y_test=y_test, model_spec=spec,
                 num_classes=num_classes, recipe=recipe, lr=lr, seed=seed + i, device=device,
                 steps_per_epoch=steps_per_epoch) for i in range(runs)]
    per_run = _run_seeds(jobs, workers=workers)
    accs = [r["test_acc"] for r in per_run]
    mean, std = _mean_std(accs)
    return {
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


def _resolve_spec(model: dict | str) -> dict:
    from mttlss.models import model_spec

    return model_spec(model) if isinstance(model, str) else dict(model)


# --------------------------------------------------------------------------- artifacts and real data


def _load_manifest_dataset(manifest: dict, data_root: Any) -> Any:
    import inspect

    from mttlss.data import load_dataset

    ds = manifest.get("dataset", {})
    if "name" not in ds:
        raise ValueError("artifact manifest has no dataset.name; pass data=load_dataset(...) explicitly")
    split = dict(ds.get("split") or {})
    if "seed" in split:  # data.py records the split seed as "seed"; load_dataset takes it as split_seed
        split.setdefault("split_seed", split.pop("seed"))
    accepted = set(inspect.signature(load_dataset).parameters) - {"name", "data_root"}
    root = data_root if data_root is not None else ds.get("data_root")  # where the run read its data
    return load_dataset(ds["name"], data_root=root, **{k: v for k, v in split.items() if k in accepted})


def _check_compatible(images: Tensor, labels: Tensor, manifest: dict, data: Any) -> None:
    ds = manifest.get("dataset", {})
    if ds.get("name") and getattr(data, "name", None) and ds["name"] != data.name:
        raise ValueError(f"artifact was distilled on {ds['name']!r} but evaluation data is {data.name!r}")
    if tuple(images.shape[1:]) != tuple(data.x_test.shape[1:]):
        raise ValueError(f"synthetic images have shape {tuple(images.shape[1:])} but {data.name!r} images have "
                         f"{tuple(data.x_test.shape[1:])}; evaluate on the dataset the artifact was distilled on")
    k = ds.get("num_classes", data.num_classes)
    if k != data.num_classes or (labels.dim() == 2 and labels.shape[1] != data.num_classes) or \
            (labels.dim() == 1 and labels.numel() and int(labels.max()) >= data.num_classes):
        raise ValueError(f"artifact has {k} classes (labels {tuple(labels.shape)}) but {data.name!r} has "
                         f"{data.num_classes}; evaluate on the dataset the artifact was distilled on")


def evaluate_artifact(
    artifact_or_path: Any,
    *,
    data: Any | None = None,  # RealData; loaded from the manifest when None
    data_root: Any = None,
    model: str | dict | None = None,  # None -> the manifest's model spec
    runs: int = 5,
    recipe: str | EvalRecipe = "mtt-1000",
    epochs: int | None = None,  # overrides the recipe's epochs
    seed: int = 0,
    device: str | None = None,
    workers: int = 1,
    split: str = "test",  # "val" for model selection; "test" once per final artifact
    record: bool = False,  # append the results to the artifact's manifest
) -> dict:
    """Evaluate an artifact directory (or loaded Artifact) with a named recipe; needs nothing else."""
    from mttlss import artifact as artifact_mod
    from mttlss.distributed import default_device

    art = artifact_mod.load(artifact_or_path) if not hasattr(artifact_or_path, "images") else artifact_or_path
    if split not in ("test", "val"):
        raise ValueError(f"split={split!r}; use 'val' (model selection) or 'test' (final report)")
    recipe = _as_recipe(recipe)
    if epochs is not None and epochs != recipe.epochs:  # a changed recipe gets a name that says so
        recipe = replace(recipe, epochs=epochs, name=f"{recipe.name}@{epochs}ep")
    manifest = art.manifest
    data = data if data is not None else _load_manifest_dataset(manifest, data_root)
    images, labels = art.images(), art.labels
    _check_compatible(images, labels, manifest, data)
    x_eval, y_eval = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    if x_eval is None or len(x_eval) == 0:
        raise ValueError(f"dataset {data.name!r} has no {split} split; use load_dataset(..., val_fraction>0)")
    # The artifact's own preprocessor (normalisation / ZCA fitted at distillation time) maps the pixel
    # test images into the synthetic images' space; skipping this gives ~chance accuracy.
    x_eval = art.preprocessor(x_eval)
    targets = art.targets() if art.label_kind != "hard" else labels
    result = evaluate_synthetic(
        images=images, targets=targets, x_test=x_eval, y_test=y_eval, eval_split=split,
        # the field's default network when neither the caller nor the manifest names one
        model_spec=model or manifest.get("model") or "convnet", num_classes=data.num_classes,
        lr=art.lr, recipe=recipe, runs=runs, seed=seed, device=default_device(device), workers=workers,
        ipc=manifest.get("ipc"),
    )
    if recipe.lr is None:
        result["recipe"]["lr_source"] = "artifact"
    result["label_kind"] = art.label_kind
    result["dataset"] = data.name
    from mttlss.distributed import init_distributed

    if record and init_distributed().is_main:  # under torchrun every rank holds the gathered result; one writes
        artifact_mod.add_results(getattr(art, "path", artifact_or_path), result)
    return result


def evaluate_full_data(
    data: Any,  # RealData
    *,
    preprocessor: Callable[[Tensor], Tensor] | None,  # pixel -> training space; None = identity
    model_spec: dict | str,
    recipe: str | EvalRecipe = "full-30",
    lr: float | None = None,  # None -> the recipe's lr (0.01 for full-30)
    runs: int = 1,
    seed: int = 0,
    device: str | None = None,
    workers: int = 1,
    split: str = "test",
) -> dict:
    """The upper bound: the same network and recipe trained on the whole training split (hard labels)."""
    from mttlss.distributed import default_device

    recipe = _as_recipe(recipe)
    if lr is not None:
        recipe = replace(recipe, lr=lr)
    prep = preprocessor or (lambda x: x)
    x_eval, y_eval = (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)
    result = evaluate_synthetic(
        images=prep(data.x_train), targets=data.y_train, x_test=prep(x_eval), y_test=y_eval,
        model_spec=model_spec, num_classes=data.num_classes, lr=None, recipe=recipe, runs=runs, seed=seed,
        device=default_device(device), workers=workers, eval_split=split,
    )
    result.update(dataset=getattr(data, "name", None), full_data=True)
    return result


def format_results(results: dict) -> str:
    """One line, result first and every setting echoed after it (DC-BENCH style), ready to paste."""
    r, m = results["recipe"], results.get("model", {})
    accs = ", ".join(f"{100 * a:.2f}" for a in results["accs"])
    model = m.get("name", "?") + "".join(f" {k}={v}" for k, v in m.items() if k != "name")
    return (
        f"{results.get('eval_split', 'test')} acc {100 * results['mean']:.2f} ± {100 * results['std']:.2f} % "
        f"over {len(results['accs'])} runs (accs {accs}; seeds {[x['seed'] for x in results['runs']]}) | "
        f"recipe {r['name']}: epochs {r['epochs']} ({r['epoch_mode']}), batch {r['batch_size']}, "
        f"lr {r['lr']:.4g} ({r.get('lr_source', '?')}) x{r['lr_decay']} at {r['lr_decay_at']}, "
        f"momentum {r['momentum']}, wd {r['weight_decay']}, dsa {r['dsa_strategy'] if r['dsa'] else 'off'}, "
        f"labels {r.get('labels', '?')}, n_train {results['n_train']}, model {model}, "
        f"select_on {results['select_on']}"
    )
