"""The self-describing artifact: one safetensors file holding a distilled set and everything needed to use it.

Layout of ``<name>.safetensors`` (e.g. ``cifar10_ipc1.safetensors``):

- ``synthetic.<name>``: the synthetic set's ``state_dict`` as stored (pixels, or mappers + codes for a
  low-rank set). The storage is what the IPC budget counts, so decoded images are *not* stored; ``load``
  rebuilds the set and decodes on demand.
- ``labels``: [n, classes] float32 or float16 logits (soft labels; temperature in the manifest) or [n] int64
  (hard); or, for soft labels stored top-k (``label_topk``), ``labels_topk_values`` [n, k] log-probabilities
  (float32 or float16) and ``labels_topk_index`` [n, k] int16 classes instead (``labels.encode_labels``). The
  manifest's ``labels`` says how well the labels as stored carry the class (agreement = argmax is the image's
  class, mean largest and own-class probability); ``storage`` counts them beside the images' floats
  (``label_floats`` in float32-equivalents = ``label_bytes`` / 4, with ``label_dtype`` and ``label_topk``).
- ``lr``: 0-dim float32, the learned step size alpha = the evaluation learning rate.
- the preprocessing state under its own names (``preprocess.mean``/``preprocess.std`` or ``zca.*``), so
  the ZCA never has to be rediscovered.
- metadata key ``"mttlss"``: the JSON manifest (dataset, budget, parameterization, labels, model, config,
  provenance, results). safetensors metadata is str -> str, so the manifest is one JSON string.

``load(path)`` returns an :class:`Artifact` with the images, labels (soft ones as float32 logits [n, classes],
however stored), lr and a ready-to-use test transform.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import safetensors  # used as safetensors.safe_open, so a test can watch what read_manifest opens
import torch
import torch.utils.data

from mttlss import __version__
from mttlss.errors import UserError
from mttlss.io_utils import atomic_save_safetensors
from mttlss.labels import STORED_LABELS, decode_labels, encode_labels, label_stats
from mttlss.parameterization import build_synthetic_set
from mttlss.preprocessing import Preprocessor
from mttlss.schema import Nullable, check_record, require

FORMAT = "mttlss-artifact"
FORMAT_VERSION = 1
METADATA_KEY = "mttlss"
SYNTHETIC_PREFIX = "synthetic."
_RESERVED = (*STORED_LABELS, "lr")  # the artifact's own tensors (the rest is the preprocessing state)
LABEL_KINDS = ("hard", "logits")


class ArtifactError(UserError, RuntimeError):
    """A file that is missing, damaged, foreign or too new to be read as an mttlss artifact."""


# ----------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """HEAD of the git checkout this package is imported from (editable installs), else None."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if top.returncode != 0:
            return None
        # Only trust the revision if the checkout is this project (not some repo a venv happens to live in).
        if not (Path(top.stdout.strip()) / "pyproject.toml").is_file():
            return None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        return head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    return {
        "mttlss_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "git_revision": git_revision(),
        "argv": list(sys.argv),
        "created": _utc_now(),
    }


def label_kind_of(labels: torch.Tensor) -> str:
    """"hard" for [n] integer labels, "logits" for [n, classes] float labels; anything else is an error."""
    if labels.dim() == 1 and not labels.is_floating_point():
        return "hard"
    if labels.dim() == 2 and labels.is_floating_point():
        return "logits"
    raise ValueError(f"labels must be [n] int64 (hard) or [n, classes] float logits (soft); "
                     f"got {labels.dtype} {tuple(labels.shape)}")


def _label_storage(kind: str, stored: dict[str, torch.Tensor]) -> dict:
    """The manifest's account of the stored labels: hard labels are implied by class-major order (nothing counted)."""
    if kind == "hard":
        return {"label_floats": 0, "label_bytes": 0, "label_dtype": None, "label_topk": None}
    nbytes = sum(t.numel() * t.element_size() for t in stored.values())
    values = stored.get("labels_topk_values", stored.get("labels"))
    return {"label_floats": nbytes // 4 if nbytes % 4 == 0 else nbytes / 4, "label_bytes": int(nbytes),
            "label_dtype": str(values.dtype).removeprefix("torch."),
            "label_topk": int(values.shape[1]) if "labels_topk_values" in stored else None}


def build_manifest(*, synthetic, labels: torch.Tensor, lr: float, preprocessor, dataset: dict, ipc: int,
                   model: dict | None = None, experts: dict | None = None, selection: dict | None = None,
                   config: dict | None = None, results: list | None = None, extra: dict | None = None,
                   stored_labels: dict[str, torch.Tensor] | None = None) -> dict:
    """The JSON manifest of an artifact, from what the caller has (missing parts are null / defaults).

    ``labels``: as ``load`` returns them; ``stored_labels``: the tensors the file holds for them
    (``labels.encode_labels``; None: ``labels`` as they are)."""
    c, h, w = (int(s) for s in synthetic.image_shape)
    num_classes = int(synthetic.num_classes)
    kind = label_kind_of(labels)
    ds = dict(dataset)
    ds.setdefault("name", None)
    ds.setdefault("class_names", None)
    ds.setdefault("num_classes", num_classes)
    ds.setdefault("image_shape", [c, h, w])
    ds.setdefault("split", None)
    if ds["num_classes"] != num_classes:
        raise ValueError(f"dataset num_classes={ds['num_classes']} but the synthetic set has {num_classes} classes")
    if ds["class_names"] is not None and len(ds["class_names"]) != num_classes:
        raise ValueError(f"dataset class_names has {len(ds['class_names'])} names for {num_classes} classes")
    image_floats = synthetic.stored_floats()
    label_storage = _label_storage(kind, stored_labels if stored_labels is not None else {"labels": labels})
    sel = {"select_on": "none", "iteration": None, "score": None}
    sel.update(selection or {})
    if sel["select_on"] not in ("val", "test", "none"):
        raise ValueError(f"selection select_on={sel['select_on']!r}; valid: val, test, none")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset": ds,
        "ipc": int(ipc),
        "synthetic": synthetic.describe(),
        "storage": {
            "budget_floats": int(ipc) * num_classes * c * h * w,
            "stored_floats_images": int(image_floats),
            **label_storage,
            "stored_floats_with_labels": int(image_floats) + label_storage["label_floats"],
            "images_per_class": int(synthetic.images_per_class),
            "num_images": int(synthetic.num_images),
        },
        "preprocessing": preprocessor.meta(),
        "labels": {"kind": kind, "temperature": 1.0, "shape": list(labels.shape),
                   **label_stats(labels, synthetic.labels_hard())},  # class-major: row i's class is labels_hard()[i]
        "lr": float(lr),
        "model": model,
        "experts": experts,
        "selection": sel,
        "config": config,
        "provenance": provenance(),
        "results": list(results or []),
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"extra key {key!r} would overwrite a manifest field; pick another name")
        manifest[key] = value
    return manifest


# ----------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------


def _encode(manifest: dict) -> dict[str, str]:
    try:
        return {METADATA_KEY: json.dumps(manifest, allow_nan=True)}
    except TypeError as exc:
        raise ValueError(f"the manifest is not JSON-able ({exc}); pass plain dicts/lists/numbers/strings "
                         f"in model, experts, config, results and extra") from exc


def save_artifact(path, *, synthetic, labels: torch.Tensor, lr: float, preprocessor, dataset: dict, ipc: int,
                  model: dict | None = None, experts: dict | None = None, selection: dict | None = None,
                  config: dict | None = None, results: list | None = None, extra: dict | None = None,
                  label_dtype: str = "float32", label_topk: int | None = None) -> Path:
    """Write one artifact file atomically; returns its path. See the module docstring for the layout.

    Soft labels are stored in ``label_dtype``, all classes or the top ``label_topk`` (``labels.encode_labels``);
    hard labels ignore both."""
    labels = labels.detach().cpu()
    if labels.shape[0] != synthetic.num_images:
        raise ValueError(f"{labels.shape[0]} labels for {synthetic.num_images} synthetic images; "
                         f"labels must be class-major, one per decoded image")
    if label_kind_of(labels) == "logits":
        if labels.shape[1] != synthetic.num_classes:
            raise ValueError(f"logits have {labels.shape[1]} columns for {synthetic.num_classes} classes")
        stored = encode_labels(labels, dtype=label_dtype, topk=label_topk)
        labels = decode_labels(stored, num_classes=synthetic.num_classes)  # what load returns: the manifest scores it
    else:
        stored = {"labels": labels.long()}
        labels = stored["labels"]
    manifest = build_manifest(synthetic=synthetic, labels=labels, lr=lr, preprocessor=preprocessor,
                              dataset=dataset, ipc=ipc, model=model, experts=experts, selection=selection,
                              config=config, results=results, extra=extra, stored_labels=stored)
    tensors = {SYNTHETIC_PREFIX + k: v for k, v in synthetic.state_dict().items()}
    tensors.update(stored)
    tensors["lr"] = torch.tensor(float(lr), dtype=torch.float32)
    for name, t in preprocessor.state_dict().items():
        if name in tensors or name.startswith(SYNTHETIC_PREFIX):
            raise ValueError(f"preprocessing tensor name {name!r} clashes with the artifact's own names")
        tensors[name] = t
    return atomic_save_safetensors(path, tensors, metadata=_encode(manifest))


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------


def _check_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"No artifact at {path}: check the path (artifacts are single .safetensors files "
                            f"written by `mttlss distill`).")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" It contains: {', '.join(found)}." if found else ""
        raise ArtifactError(f"{path} is a directory; pass the artifact's .safetensors file inside it.{hint}")
    return path


def _damaged(path: Path, exc: Exception) -> ArtifactError:
    return ArtifactError(f"{path} is damaged or not a safetensors file ({type(exc).__name__}: {exc}); "
                         f"re-download or re-export it, or point to the right file.")


def _parse_manifest(path: Path, metadata: dict | None) -> dict:
    if not metadata or METADATA_KEY not in metadata:
        raise ArtifactError(f"{path} is a safetensors file but not an mttlss artifact (no {METADATA_KEY!r} "
                            f"metadata); files written by other tools cannot be loaded with mttlss.load.")
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: the mttlss manifest is not valid JSON ({exc}); the file is damaged, "
                            f"re-create or re-download it.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an mttlss artifact (manifest format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {FORMAT!r}).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format_version {version!r}, but this mttlss reads versions "
                            f"<= {FORMAT_VERSION}; upgrade: pip install -U mttlss.")
    check_record(manifest, MANIFEST_SCHEMA, file=path, fix=_FIX)
    return manifest


_FIX = "the artifact's manifest is damaged or was edited by hand; re-create the artifact (mttlss distill, mttlss random)"
MANIFEST_SCHEMA = {
    "dataset": {"name": Nullable(str), "class_names": Nullable(list), "num_classes": Nullable(int),
                "image_shape": Nullable(list), "split": Nullable(dict), "data_root": Nullable(str)},
    "ipc": int, "synthetic": dict, "preprocessing": {"kind": str}, "labels": Nullable(dict),
    "model": Nullable(dict), "selection": Nullable(dict), "results": Nullable(list),
}


def _check_classes(path: Path, manifest: dict, num_classes: int) -> None:
    """The manifest's class count and class names against the stored set's classes."""
    ds = manifest["dataset"]
    require(ds.get("num_classes") in (None, num_classes), file=path, field="dataset.num_classes",
            problem=f"says {ds.get('num_classes')} classes but the stored set has {num_classes}", fix=_FIX)
    names = ds.get("class_names")
    require(names is None or (len(names) == num_classes and all(isinstance(n, str) for n in names)), file=path,
            field="dataset.class_names", problem=f"{len(names or [])} names for {num_classes} classes", fix=_FIX)


def read_manifest(path) -> dict:
    """The manifest alone, from the file header (no tensor is loaded)."""
    path = _check_path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
    except Exception as exc:  # safetensors raises its own error types (and OSError) for bad headers
        raise _damaged(path, exc) from exc
    return _parse_manifest(path, metadata)


def _read_all(path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = _check_path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            manifest = _parse_manifest(path, metadata)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ArtifactError:
        raise
    except Exception as exc:
        raise _damaged(path, exc) from exc
    topk = {"labels_topk_values", "labels_topk_index"} <= tensors.keys()
    for name, present in (("labels", "labels" in tensors or topk), ("lr", "lr" in tensors)):
        if not present:
            raise ArtifactError(f"{path}: tensor {name!r} is missing; the artifact is incomplete, re-create it.")
    return manifest, tensors


@dataclass
class Artifact:
    """A loaded artifact. ``images()`` decodes the stored factors; labels are as stored (logits or ints)."""

    path: Path
    manifest: dict
    synthetic: Any  # SyntheticSet
    labels: torch.Tensor  # [n, classes] float32 logits (however the file stores them), or [n] int64
    lr: float
    preprocessor: Any  # Preprocessor: pixel [0, 1] <-> training space

    @property
    def label_kind(self) -> str:
        return "logits" if self.labels.is_floating_point() else "hard"

    @property
    def class_names(self) -> list[str]:
        names = self.manifest["dataset"].get("class_names")
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return int(self.synthetic.num_classes)

    @property
    def space(self) -> str:
        """The training space the images live in ("normalized" or "zca")."""
        return self.preprocessor.space

    @property
    def temperature(self) -> float:
        return float(self.manifest.get("labels", {}).get("temperature", 1.0))

    def images(self) -> torch.Tensor:
        """[n, C, H, W] decoded images in the training space, class-major, without autograd history."""
        with torch.no_grad():
            return self.synthetic.decode().detach().clone()

    def images_pixels(self) -> torch.Tensor:
        """[n, C, H, W] in pixel space via the inverse preprocessing. NOT clamped: optimised images leave [0, 1]."""
        with torch.no_grad():
            return self.preprocessor.inverse(self.images())

    def targets(self) -> torch.Tensor:
        """[n, classes] probabilities: softmax(logits / T) for soft labels, one-hot for hard labels."""
        if self.label_kind == "logits":
            return torch.softmax(self.labels.float() / self.temperature, dim=1)
        return torch.nn.functional.one_hot(self.labels, self.num_classes).float()

    def hard_labels(self) -> torch.Tensor:
        """[n] int64: argmax of the logits, or the stored ints."""
        return self.labels.argmax(dim=1) if self.label_kind == "logits" else self.labels.clone()

    def dataset(self, space: str = "training") -> torch.utils.data.TensorDataset:
        """(image, label-as-stored) pairs; space "training" (what models train on) or "pixel"."""
        if space == "training":
            x = self.images()
        elif space == "pixel":
            x = self.images_pixels()
        else:
            raise ValueError(f"space={space!r}; valid: training, pixel")
        return torch.utils.data.TensorDataset(x, self.labels)

    def test_transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps a pixel [0, 1] batch [B, C, H, W] to the training space, as the synthetic images are."""
        return self.preprocessor

    def __repr__(self) -> str:
        ds = self.manifest.get("dataset", {}).get("name")
        return (f"Artifact({str(self.path)!r}, dataset={ds!r}, ipc={self.manifest.get('ipc')}, "
                f"type={self.manifest.get('synthetic', {}).get('type')!r}, images={self.synthetic.num_images}, "
                f"labels={self.label_kind}, space={self.space!r}, lr={self.lr:.4g})")


def _loaded_labels(tensors: dict[str, torch.Tensor], *, num_classes: int) -> torch.Tensor:
    """Hard labels [n] int64 as stored; soft ones as float32 logits [n, classes], whichever form the file holds."""
    hard = tensors.get("labels")
    if hard is not None and not hard.is_floating_point():
        return hard
    return decode_labels({k: tensors[k] for k in STORED_LABELS if k in tensors}, num_classes=num_classes)


def load(path) -> Artifact:
    """Load an artifact file written by :func:`save_artifact`; raises ArtifactError for unusable files."""
    manifest, tensors = _read_all(path)
    path = Path(path)
    state = {k[len(SYNTHETIC_PREFIX):]: v for k, v in tensors.items() if k.startswith(SYNTHETIC_PREFIX)}
    try:
        synthetic = build_synthetic_set(manifest["synthetic"])
        synthetic.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"{path}: the synthetic set does not match its description ({exc}); the file is "
                            f"damaged or was written by an incompatible mttlss version.") from exc
    pre_tensors = {k: v for k, v in tensors.items() if not k.startswith(SYNTHETIC_PREFIX) and k not in _RESERVED}
    try:
        preprocessor = Preprocessor.from_state(manifest["preprocessing"], pre_tensors)
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"{path}: the preprocessing state is incomplete ({exc}); re-create the artifact.") from exc
    _check_classes(path, manifest, int(synthetic.num_classes))
    try:
        labels = _loaded_labels(tensors, num_classes=int(synthetic.num_classes))
    except (RuntimeError, ValueError, IndexError) as exc:  # e.g. a top-k class index beyond the classes
        raise ArtifactError(f"{path}: the stored labels are damaged ({exc}); re-create the artifact.") from exc
    if labels.shape[0] != synthetic.num_images:
        raise ArtifactError(f"{path}: {labels.shape[0]} labels for {synthetic.num_images} images; re-create it.")
    return Artifact(path=path, manifest=manifest, synthetic=synthetic, labels=labels,
                    lr=float(tensors["lr"]), preprocessor=preprocessor)


def add_results(path, results: dict) -> None:
    """Append one evaluation record to manifest["results"] and rewrite the file atomically."""
    manifest, tensors = _read_all(path)
    record = dict(results)
    record.setdefault("recorded", _utc_now())
    manifest.setdefault("results", []).append(record)
    atomic_save_safetensors(path, tensors, metadata=_encode(manifest))


# ----------------------------------------------------------------------------------------------------
# Human-readable summary (`mttlss info`)
# ----------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _label_quality(lab: dict) -> str:
    if "agreement" not in lab:  # artifacts written before labels were scored
        return ""
    return (f" agreement={100 * lab['agreement']:.1f}% mean max prob={lab['mean_max_prob']:.3f} "
            f"own-class prob={lab['mean_own_prob']:.3f}")


def _label_format(storage: dict) -> str:
    """How soft labels are stored, e.g. " (float16, top-1, 4000 bytes)"; nothing for hard labels and for artifacts
    written before labels could be stored compactly (float32 logits of every class)."""
    if not storage.get("label_dtype"):
        return ""
    topk = storage.get("label_topk")
    return (f" ({storage['label_dtype']}, {f'top-{topk}' if topk else 'all classes'}, "
            f"{storage.get('label_bytes')} bytes)")


def _memory_choice(choice: dict | None) -> list[str]:
    """How the run differentiated its unroll (``manifest["init"]["memory"]``): full graph, checkpointed replay, or
    TESLA's approximate replay (``exact`` false)."""
    if not choice:
        return []
    approximate = " (APPROXIMATE gradients)" if choice.get("exact") is False else ""
    return [f"  unroll memory {choice.get('mode')}{approximate}: {choice.get('why')}"]


def _precision_choice(choice: dict | None) -> list[str]:
    """The student network's precision in the unroll (``manifest["init"]["precision"]``): fp32, or bf16 products (BF16Products)."""
    return [f"  unroll precision {choice.get('mode')}: {choice.get('why')}"] if choice else []


def _guard_choice(choice: dict | None) -> list[str]:
    """Whether the update guard stayed on (``manifest["init"]["guard"]``, from the start's probe of the loss)."""
    return [f"  update guard  {'lifted' if choice.get('lifted') else 'on'}: {choice.get('why')}"] if choice else []


def _label_choice(choice: dict | None) -> list[str]:
    """How a distilled run chose its starting labels (``manifest["init"]["labels"]``), as lines."""
    if not choice:
        return []
    lines = [f"  label start   {choice.get('mode')}: {choice.get('why')}"]
    soft = choice.get("soft") or {}
    if soft:
        lines.append(f"                soft labels from {choice.get('init')}: {soft.get('why')}")
    start = choice.get("start") or {}
    if start and choice.get("mode") == "soft":  # hard labels are one-hot: nothing to say
        lines.append(f"                at the start: {_label_quality(start).strip()}")
    return lines


def label_summary(manifest: dict) -> str:
    """One results-table cell: the label kind, how a distilled run chose its start, and for soft labels the
    agreement (argmax = class) and own-class probability at the start -> in the artifact."""
    lab = manifest.get("labels") or {}
    choice = (manifest.get("init") or {}).get("labels") or {}
    soft = lab.get("kind") == "logits"
    parts = ["soft" if soft else "hard"]
    accs = choice.get("val_acc") or {}
    if "hard" in accs:  # labels=auto measured both
        parts.append(f"auto: val soft {100 * accs['soft']:.1f} / hard {100 * accs['hard']:.1f} %")
    elif choice.get("requested"):
        parts.append(f"labels={choice['requested']}")
    picked = choice.get("soft") or {}
    if soft and picked:
        parts.append(f"{picked['knob'].removeprefix('label_')} {picked['chosen']:g}")
    start = choice.get("start") or {}
    if soft and start and "agreement" in lab:
        parts.append(f"agreement {100 * start['agreement']:.0f} -> {100 * lab['agreement']:.0f} %, own prob "
                     f"{start['mean_own_prob']:.2f} -> {lab['mean_own_prob']:.2f}")
    return "; ".join(parts)


def format_manifest(manifest: dict) -> str:
    """Readable multi-line summary of a manifest."""
    ds = manifest.get("dataset") or {}
    st = manifest.get("storage") or {}
    syn = dict(manifest.get("synthetic") or {})
    syn.pop("shapes", None)
    lab = manifest.get("labels") or {}
    sel = manifest.get("selection") or {}
    prov = manifest.get("provenance") or {}
    pre = manifest.get("preprocessing") or {}
    names = ds.get("class_names") or []
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} total)" if len(names) > 10 else "")
    budget = st.get("budget_floats") or 0
    used = st.get("stored_floats_images")
    pct = f" ({100.0 * used / budget:.1f}% of budget)" if budget and used is not None else ""
    lines = [
        f"mttlss artifact (format {manifest.get('format_version')})",
        f"  dataset       {ds.get('name')}  classes={ds.get('num_classes')}  image_shape={ds.get('image_shape')}",
        f"  class names   {shown}",
        f"  IPC (budget)  {manifest.get('ipc')}  -> {st.get('images_per_class')} images per class, "
        f"{st.get('num_images')} images",
        f"  storage       {used} floats in images{pct}; {st.get('label_floats')} in labels{_label_format(st)}; "
        f"{st.get('stored_floats_with_labels')} total; budget {budget}",
        f"  synthetic     {_fmt(syn)}",
        f"  space         {pre.get('space')} ({_fmt({k: v for k, v in pre.items() if k != 'space'})})",
        f"  labels        {lab.get('kind')} shape={lab.get('shape')} temperature={lab.get('temperature')}"
        + _label_quality(lab),
        *_label_choice((manifest.get("init") or {}).get("labels")),
        *_memory_choice((manifest.get("init") or {}).get("memory")),
        *_precision_choice((manifest.get("init") or {}).get("precision")),
        *_guard_choice((manifest.get("init") or {}).get("guard")),
        f"  lr            {_fmt(manifest.get('lr'))}",
        f"  model         {_fmt(manifest.get('model'))}",
        f"  experts       {_fmt(manifest.get('experts'))}",
        f"  selection     select_on={sel.get('select_on')} iteration={sel.get('iteration')} "
        f"score={_fmt(sel.get('score'))}"
        + (f" set=ema (ema_decay={sel.get('ema_decay')})" if sel.get("set") == "ema" else ""),
        f"  provenance    mttlss {prov.get('mttlss_version')}, torch {prov.get('torch_version')}, "
        f"python {prov.get('python')}, git {prov.get('git_revision')}, created {prov.get('created')}",
        f"  command       {' '.join(prov.get('argv') or [])}",
    ]
    results = manifest.get("results") or []
    lines.append(f"  results       {len(results)} record(s)")
    for r in results:
        lines.append(f"    - {_fmt(r)}")
    return "\n".join(lines)
