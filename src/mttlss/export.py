"""Export an artifact for other tools.

- ``ddranking``: ``images.pt`` / ``labels.pt`` / ``lr.pt`` (the DATM / DD-Ranking trio, bare tensors that
  ``torch.load(..., weights_only=True)`` reads) plus a sidecar ``export.json``.
- ``imagefolder``: ``<out>/<class_name>/<idx:05d>.png``, pixel space clamped to [0, 1], uint8;
  ``idx`` is the image's position in the artifact (class-major), i.e. its row in ``labels``; the folder is
  the class the image was distilled for (with soft labels the argmax may differ for a few images).
- ``npz``: ``synthetic.npz`` (no pickled objects) with pixel-space NHWC images, training-space NCHW images,
  labels as stored, hard labels, class names and lr.

Every file is written atomically; every format also writes ``export.json`` describing what was written.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mttlss.artifact import Artifact, load
from mttlss.data import canonical_name
from mttlss.io_utils import atomic_torch_save, atomic_write_bytes, atomic_write_json
from mttlss.preprocessing import NORMALIZATION

FORMATS = ("ddranking", "imagefolder", "npz")
# `fitted_on` values meaning the ZCA already used the whole training split, as DD-Ranking's own fit does.
_FULL_TRAIN = ("train", "full-train", "train-full", "full_train")
# What DD-Ranking 0.2.0 normalises its real CIFAR images with when use_zca is off (ddranking/utils/data.py,
# get_dataset): the field's constants, CIFAR-10's reused for CIFAR-100. Its loader has no SVHN.
DDRANKING_NORMALIZATION = {"cifar10": NORMALIZATION["cifar10"], "cifar100": NORMALIZATION["cifar100"]}


def ddranking_dataset(art: Artifact, as_dataset: str | None = None) -> str | None:
    """The DD-Ranking dataset an artifact belongs to: ``as_dataset``, else the normalisation convention it
    recorded, else its dataset's name (None for npz:/folder: copies that recorded no convention)."""
    if as_dataset is not None:
        key = canonical_name(as_dataset)
        if key not in DDRANKING_NORMALIZATION:
            raise ValueError(f"DD-Ranking knows {', '.join(DDRANKING_NORMALIZATION)} among these datasets, not {as_dataset!r}")
        return key
    pre = art.manifest.get("preprocessing", {})
    for key in (pre.get("convention"), canonical_name(art.manifest.get("dataset", {}).get("name") or "")):
        if key in DDRANKING_NORMALIZATION:
            return key
    return None


def export(artifact: Artifact | str, *, fmt: str, out_dir, full_train_preprocessor=None,
           as_dataset: str | None = None) -> list[Path]:
    """Write ``artifact`` (an Artifact or a path) in format ``fmt`` under ``out_dir``; returns the files written.

    ``full_train_preprocessor`` (ddranking only): a ZCA Preprocessor fitted on the FULL training split, used
    to re-whiten the images the way DD-Ranking's evaluator will (it refits ZCA on the full train set).
    ``as_dataset`` (ddranking only): the DD-Ranking dataset ("cifar10", "cifar100") of an artifact made from an
    npz:/folder: copy that recorded no convention; mean/std images are re-normalised to its constants.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    art = artifact if isinstance(artifact, Artifact) else load(artifact)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if full_train_preprocessor is not None and fmt != "ddranking":
        raise ValueError("full_train_preprocessor only applies to fmt='ddranking'")
    if fmt == "ddranking":
        return _export_ddranking(art, out, full_train_preprocessor, ddranking_dataset(art, as_dataset))
    if fmt == "imagefolder":
        return _export_imagefolder(art, out)
    return _export_npz(art, out)


def _common_sidecar(art: Artifact, fmt: str) -> dict:
    m = art.manifest
    return {
        "format": fmt,
        "source_artifact": str(Path(art.path).resolve()),
        "dataset": m.get("dataset", {}).get("name"),
        "class_names": art.class_names,
        "storage_ipc": m.get("ipc"),
        "images_per_class": art.synthetic.images_per_class,
        "num_images": art.synthetic.num_images,
        "label_kind": art.label_kind,
        "label_temperature": art.temperature,
        "lr": art.lr,
    }


def _ddranking_normalized(art: Artifact, images: torch.Tensor, target: str | None) -> tuple[torch.Tensor, str, bool]:
    """Mean/std images [n, C, H, W] in the constants DD-Ranking normalises its test images with; (images, note,
    whether they were re-normalised)."""
    pre = art.preprocessor
    if target is None:
        return images, (f"mean/std normalised with mean={pre.mean.tolist()}, std={pre.std.tolist()}; the dataset is not "
                        f"one DD-Ranking loads (or an npz/folder copy without a recorded convention: export with "
                        f"--as-dataset cifar10|cifar100 to re-normalise to DD-Ranking's constants)"), False
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in DDRANKING_NORMALIZATION[target])
    if torch.allclose(pre.mean.float().cpu(), mean) and torch.allclose(pre.std.float().cpu(), std):
        return images, f"mean/std normalised with DD-Ranking's {target} constants already; run it with use_zca=False", False
    pixels = pre.inverse(images)  # [n, C, H, W], pixel space
    images = (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return images, (f"re-normalised from mean={[round(v, 4) for v in pre.mean.tolist()]}, std="
                    f"{[round(v, 4) for v in pre.std.tolist()]} to DD-Ranking's {target} constants; run it with "
                    f"use_zca=False"), True


def _export_ddranking(art: Artifact, out: Path, full_train_pre, target: str | None) -> list[Path]:
    images = art.images()  # [n, C, H, W], our training space, class-major
    space = art.space
    fitted_on = art.manifest.get("preprocessing", {}).get("fitted_on")
    zca_refit = renormalized = False
    if space == "zca":
        if full_train_pre is not None:
            if getattr(full_train_pre, "kind", None) != "zca":
                raise ValueError(f"full_train_preprocessor must be a ZCA Preprocessor, got kind="
                                 f"{getattr(full_train_pre, 'kind', None)!r}")
            # Back to pixels with our (train-minus-val) ZCA, then whiten as DD-Ranking will.
            images = full_train_pre(art.preprocessor.inverse(images))
            zca_refit = True
            zca_note = "images re-whitened with the given full-train ZCA, as DD-Ranking fits it (use_zca=True)"
        elif fitted_on in _FULL_TRAIN:
            zca_note = "our ZCA was fitted on the full train split, like DD-Ranking's; exported as is"
        else:
            zca_note = (f"exported in OUR ZCA space (fitted on {fitted_on!r}); DD-Ranking refits ZCA on the full "
                        f"train split, so its whitening differs slightly. Pass full_train_preprocessor "
                        f"(a ZCA fitted on the full train split; `mttlss export --full-train-zca`) to convert.")
    elif space == "normalized":
        images, zca_note, renormalized = _ddranking_normalized(art, images, target)
    else:
        zca_note = f"space {space!r}: images exported as is; DD-Ranking will not preprocess tensors it is given"
    lr = torch.tensor(float(art.lr), dtype=torch.float32)  # 0-dim, what DD-Ranking accepts as syn_lr
    files = [
        atomic_torch_save(out / "images.pt", images.float().contiguous()),
        atomic_torch_save(out / "labels.pt", art.labels.clone()),
        atomic_torch_save(out / "lr.pt", lr),
    ]
    n = art.synthetic.images_per_class
    sidecar = _common_sidecar(art, "ddranking")
    sidecar.update({
        "ipc_to_pass": n,
        "note": (f"DD-Ranking assumes ipc x classes images in class order. This set stores IPC "
                 f"{art.manifest.get('ipc')} worth of floats but decodes to {n} images per class: pass ipc = {n} "
                 f"to DD-Ranking so labels align (its random-subset baseline then uses {n} real images per "
                 f"class, a conservative comparison)."),
        "space": space,
        "zca_fitted_on": fitted_on if space == "zca" else None,
        "zca_refit": zca_refit,
        "ddranking_dataset": target,
        "renormalized": renormalized,
        "space_note": zca_note,
        "files": [p.name for p in files],
    })
    files.append(atomic_write_json(out / "export.json", sidecar))
    return files


_MAX_NAME_BYTES = 200  # file systems allow 255 bytes per name; room left for a "000_" prefix


def _safe_dirname(name: str, index: int) -> str:
    """Class names become folder names: keep them readable, but never a path separator, empty, or longer than a
    file system allows (a 300-character class name would fail with ENAMETOOLONG)."""
    cleaned = re.sub(r"[\\/\x00:]+", "_", str(name)).strip().strip(".")
    cleaned = cleaned.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", errors="ignore").rstrip(". ")
    return cleaned or f"class_{index:03d}"


def _to_uint8_hwc(img: torch.Tensor) -> np.ndarray:
    """[C, H, W] pixel space -> [H, W] (C = 1) or [H, W, C] uint8, clamped to [0, 1] first."""
    arr = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def png_bytes(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_to_uint8_hwc(img)).save(buf, format="PNG")
    return buf.getvalue()


def _export_imagefolder(art: Artifact, out: Path) -> list[Path]:
    pixels = art.images_pixels()  # [n, C, H, W], pixel space, unclamped
    if pixels.shape[1] not in (1, 3):
        raise ValueError(f"imagefolder export needs 1 or 3 channels, the images have {pixels.shape[1]}")
    # Folder = the class the image was distilled for (its class-major position), not argmax of soft labels:
    # every class then gets exactly images_per_class files, and the soft labels stay in the artifact.
    hard = art.synthetic.labels_hard().cpu()
    names = art.class_names
    dirs = [_safe_dirname(n, i) for i, n in enumerate(names)]
    if len(set(dirs)) != len(dirs):
        dirs = [f"{i:03d}_{d}" for i, d in enumerate(dirs)]  # keep folders distinct (and in class order)
    files = []
    for idx in range(pixels.shape[0]):
        files.append(atomic_write_bytes(out / dirs[int(hard[idx])] / f"{idx:05d}.png", png_bytes(pixels[idx])))
    sidecar = _common_sidecar(art, "imagefolder")
    sidecar.update({"space": "pixel01 (clamped, uint8)", "folders": dirs,
                    "note": "file names are image indices in the artifact; for soft labels use the artifact or "
                            "the npz/ddranking export (folders carry hard labels only)"})
    files.append(atomic_write_json(out / "export.json", sidecar))
    return files


def _export_npz(art: Artifact, out: Path) -> list[Path]:
    training = art.images()  # [n, C, H, W], training space
    pixels = art.preprocessor.inverse(training)  # [n, C, H, W], pixel space, unclamped
    arrays = {
        "images_pixels": pixels.permute(0, 2, 3, 1).contiguous().float().numpy(),  # NHWC
        "images_training": training.float().contiguous().numpy(),  # NCHW
        "labels": art.labels.cpu().numpy(),
        "hard_labels": art.hard_labels().cpu().numpy().astype(np.int64),
        "class_names": np.array(art.class_names, dtype=np.str_),  # unicode array: loads without pickle
        "lr": np.array(art.lr, dtype=np.float32),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    files = [atomic_write_bytes(out / "synthetic.npz", buf.getvalue())]
    sidecar = _common_sidecar(art, "npz")
    sidecar.update({"space": art.space, "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in arrays.items()},
                    "note": "images_pixels is not clamped to [0, 1]"})
    files.append(atomic_write_json(out / "export.json", sidecar))
    return files
