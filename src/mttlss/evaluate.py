"""Evaluation protocol (method.md section 11): train fresh networks on a synthetic set, test once.

The recipe is the MTT/DATM one: a fresh ConvNet, SGD (momentum 0.9, weight decay 5e-4) at the learned
step size alpha, x0.1 at half of the epochs, DSA on every training batch, cross-entropy for hard labels and
soft cross-entropy on softmax(logits) for soft labels; the network is tested once, after the last epoch,
and the result is mean +- std over several explicitly seeded networks. Nothing here looks at test accuracy
to choose anything (``select_on: "none"``); model selection goes through ``split="val"``.

This module is the protocol and nothing else: the named, versioned recipes (``RECIPES``, ``get_recipe``),
``evaluate_artifact`` (an artifact's own preprocessing applied to the real test images, its labels, its
model), ``evaluate_full_data`` (the upper bound) and ``format_results`` (the one-line report). Training and
testing the networks themselves (``EvalRecipe``, ``train_and_test``, ``evaluate_synthetic``) is
``mttlss.training``, which distillation's validation uses too.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from mttlss import artifact as artifact_mod
from mttlss.data import load_for_artifact
from mttlss.distributed import default_device, init_distributed
from mttlss.training import EvalRecipe, check_epoch_mode, evaluate_synthetic

EVAL_SPLITS = ("test", "val")  # "val" for model selection; "test" once per final artifact

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


# --------------------------------------------------------------------------- artifacts and real data


def _check_compatible(*, images: Tensor, labels: Tensor, manifest: dict, data: Any, check_name: bool = True) -> None:
    ds = manifest.get("dataset", {})
    if check_name and ds.get("name") and getattr(data, "name", None) and ds["name"] != data.name:
        raise ValueError(f"artifact was distilled on {ds['name']!r} but evaluation data is {data.name!r}")
    if tuple(images.shape[1:]) != tuple(data.x_test.shape[1:]):
        raise ValueError(f"synthetic images have shape {tuple(images.shape[1:])} but {data.name!r} images have "
                         f"{tuple(data.x_test.shape[1:])}; evaluate on the dataset the artifact was distilled on")
    k = ds.get("num_classes", data.num_classes)
    if k != data.num_classes or (labels.dim() == 2 and labels.shape[1] != data.num_classes) or \
            (labels.dim() == 1 and labels.numel() and int(labels.max()) >= data.num_classes):
        raise ValueError(f"artifact has {k} classes (labels {tuple(labels.shape)}) but {data.name!r} has "
                         f"{data.num_classes}; evaluate on the dataset the artifact was distilled on")


def _split_of(data: Any, split: str) -> tuple[Tensor, Tensor]:
    """The pixel-space images [M, C, H, W] and labels [M] of the ``split`` networks are tested on."""
    return (data.x_test, data.y_test) if split == "test" else (data.x_val, data.y_val)


def evaluate_artifact(
    artifact_or_path: Any,
    *,
    data: Any | None = None,  # RealData; else the data the user names (dataset / data_root), checked against the manifest
    dataset: str | None = None,  # the dataset to evaluate on; None: the manifest's, if mttlss may read it unasked
    data_root: Any = None,
    model: str | dict | None = None,  # None -> the manifest's model spec
    runs: int = 5,
    recipe: str | EvalRecipe = "mtt-1000",
    epochs: int | None = None,  # overrides the recipe's epochs
    epoch_mode: str | None = None,  # overrides the recipe's epoch_mode ("repaired": pairing=random low-rank sets only)
    seed: int = 0,
    device: str | None = None,
    workers: int = 1,
    split: str = "test",  # "val" for model selection; "test" once per final artifact
    record: bool = False,  # append the results to the artifact's manifest
    resume: bool = False,  # keep each finished network's result beside the artifact; a rerun trains only the rest
) -> dict:
    """Evaluate an artifact file (or loaded Artifact) with a named recipe.

    The artifact is data, never a pointer: the dataset it names is read only when that needs no path or folder
    from the artifact (``digits``, or a torchvision dataset found under ``data_root`` / ``$MTTLSS_DATA``); an
    ``npz:`` / ``folder:`` dataset, or a download, needs the caller's ``dataset`` / ``data_root``."""
    art = artifact_mod.load(artifact_or_path) if not hasattr(artifact_or_path, "images") else artifact_or_path
    if split not in EVAL_SPLITS:
        raise ValueError(f"split={split!r}; use 'val' (model selection) or 'test' (final report)")
    recipe = _as_recipe(recipe)
    if epochs is not None and epochs != recipe.epochs:  # a changed recipe gets a name that says so
        recipe = replace(recipe, epochs=epochs, name=f"{recipe.name}@{epochs}ep")
    if epoch_mode is not None and epoch_mode != recipe.epoch_mode:
        recipe = replace(recipe, epoch_mode=epoch_mode, name=f"{recipe.name}@{epoch_mode}")
    synthetic = getattr(art, "synthetic", None)  # the set itself: "repaired" epochs re-decode it
    check_epoch_mode(recipe, synthetic=synthetic)  # before any data is read
    manifest = art.manifest
    if data is None:
        data = load_for_artifact(manifest.get("dataset", {}), dataset=dataset, data_root=data_root,
                                 source=str(getattr(art, "path", "the artifact")))
    images, labels = art.images(), art.labels
    _check_compatible(images=images, labels=labels, manifest=manifest, data=data, check_name=dataset is None)
    x_eval, y_eval = _split_of(data, split)
    if x_eval is None or len(x_eval) == 0:
        raise ValueError(f"dataset {data.name!r} has no {split} split; use load_dataset(..., val_fraction>0)")
    # The artifact's own preprocessor (normalisation / ZCA fitted at distillation time) maps the pixel
    # test images into the synthetic images' space; skipping this gives ~chance accuracy.
    x_eval = art.preprocessor(x_eval)
    targets = art.targets() if art.label_kind != "hard" else labels
    spec = model or manifest.get("model") or "convnet"  # the field's default network when nobody names one
    device = default_device(device)
    keep = None
    if resume and getattr(art, "path", None) is not None:
        keep = _keep_folder(Path(art.path), images=images, targets=targets, x_eval=x_eval, y_eval=y_eval,
                            settings={"recipe": asdict(recipe), "model": spec, "lr": art.lr, "device": device,
                                      "split": split, "ipc": manifest.get("ipc"),
                                      "set": _set_digest(synthetic) if recipe.epoch_mode == "repaired" else None})
    result = evaluate_synthetic(
        images=images, targets=targets, x_test=x_eval, y_test=y_eval, eval_split=split,
        model_spec=spec, num_classes=data.num_classes,
        lr=art.lr, recipe=recipe, runs=runs, seed=seed, device=device, workers=workers,
        ipc=manifest.get("ipc"), keep=keep, synthetic=synthetic,
    )
    if recipe.lr is None:
        result["recipe"]["lr_source"] = "artifact"
    result["label_kind"] = art.label_kind
    result["dataset"] = data.name
    if record:
        record_results(getattr(art, "path", artifact_or_path), result)
    return result


def record_results(path: Any, result: dict) -> None:
    """Append ``result`` to the artifact's manifest (under torchrun every rank holds the gathered result; rank 0
    writes)."""
    if init_distributed().is_main:
        artifact_mod.add_results(path, result)


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _set_digest(synthetic: Any) -> str:
    """All of the set's factors (every mapper, not only those the fixed pairing decodes with)."""
    return _digest(*(t for _, t in sorted(synthetic.state_dict().items())))


def _keep_folder(path: Path, *, images: Tensor, targets: Tensor, x_eval: Tensor, y_eval: Tensor,
                 settings: dict) -> Path | None:
    """``<artifact>.evaluations/<key>/``: where this evaluation keeps its finished networks. The key covers all a
    network's result depends on (the set, its labels, the test data, recipe, model, lr, device), so a rerun reuses
    only results it would have computed itself. None (a warning) where the artifact's folder is not writable."""
    key = hashlib.sha256((_digest(images, targets, x_eval, y_eval) + json.dumps(settings, sort_keys=True,
                                                                                default=str)).encode()).hexdigest()
    folder = path.with_name(path.name + ".evaluations") / key[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"warning: cannot keep finished networks in {folder} ({exc}); an interrupted evaluation will start over",
              file=sys.stderr)
        return None
    return folder


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
    recipe = _as_recipe(recipe)
    if lr is not None:
        recipe = replace(recipe, lr=lr)
    prep = preprocessor or (lambda x: x)
    x_eval, y_eval = _split_of(data, split)
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
