"""Real datasets and the held-out validation split (preprocessing lives in ``mttlss.preprocessing``).

Everything here works on in-memory tensors:

- ``load_dataset(name)`` returns a :class:`RealData` with pixel-space images ``[N, C, H, W]`` float32 in
  [0, 1] for train (minus validation), validation and test, and ``RealData.split``, the record of its split,
  whose first keys are ``load_dataset``'s own arguments (``val_fraction``, ``val_max``, ``split_seed``).
- ``dataset_record(data)`` is the dataset entry of an experts or artifact manifest, and
  ``load_recorded(record)`` loads exactly that data again (the same split): "the real data these experts,
  or this artifact, were made from".

Dataset names: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashion-mnist`` (torchvision on-disk
formats under ``data_root``), ``digits`` (scikit-learn's bundled 8x8 set, no files needed),
``npz:PATH`` (arrays ``x_train, y_train, x_test, y_test``) and ``folder:PATH`` (ImageFolder layout with
``train/`` and ``test/``).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mttlss.errors import UserError

TORCHVISION_DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")
BUILTIN_DATASETS = TORCHVISION_DATASETS + ("digits",)
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar-100": "cifar100"}
_VALID_NAMES_TEXT = ", ".join(BUILTIN_DATASETS) + ", npz:/path/to/file.npz, folder:/path/to/dir"

class DatasetError(UserError, RuntimeError):
    """A dataset could not be found or read; the message says what was expected, where, and how to get it."""


# ----------------------------------------------------------------------------------------------------------
# Container
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RealData:
    """A real dataset in memory. All images are pixel space [0, 1], float32, ``[N, C, H, W]``."""

    name: str
    class_names: list[str]
    x_train: torch.Tensor  # [N_train, C, H, W], pixel space; the training split MINUS validation
    y_train: torch.Tensor  # [N_train] int64
    x_val: torch.Tensor  # [N_val, C, H, W], stratified hold-out from the training split
    y_val: torch.Tensor
    x_test: torch.Tensor  # [N_test, C, H, W]
    y_test: torch.Tensor
    split: dict = field(default_factory=dict)  # JSON-able record of the validation split

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def class_indices(self, split: str = "train") -> list[torch.Tensor]:
        """Per-class index tensors (int64, ascending) into ``split`` ("train" | "val" | "test")."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        y = getattr(self, f"y_{split}")
        return [torch.nonzero(y == c).flatten() for c in range(self.num_classes)]


# ----------------------------------------------------------------------------------------------------------
# Validation split
# ----------------------------------------------------------------------------------------------------------


def stratified_split(
    labels: torch.Tensor, *, fraction: float, max_count: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep_idx, val_idx), both sorted int64, stratified by label.

    The validation size is ``min(max_count, round(fraction * N))``, shared among classes in proportion to
    their sizes (largest-remainder rounding, so the total is exact). Which images of a class are drawn is
    decided by a ``torch.Generator`` seeded with ``seed``: same labels + same seed -> same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    labels = torch.as_tensor(labels).flatten().to(torch.int64).cpu()
    n = labels.numel()
    total = min(int(max_count), int(round(fraction * n)))
    if total == 0 or n == 0:
        return torch.arange(n, dtype=torch.int64), torch.empty(0, dtype=torch.int64)

    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * total / n  # ideal (fractional) number of val images per class
    per_class = exact.floor().long()
    remainder = total - int(per_class.sum())
    if remainder > 0:
        # Largest fractional parts get one extra; ties go to the lower class (stable sort).
        order = torch.sort(exact - per_class.double(), descending=True, stable=True).indices
        per_class[order[:remainder]] += 1

    gen = torch.Generator().manual_seed(int(seed))
    val_parts = []
    for c, k in zip(classes.tolist(), per_class.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        val_parts.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    val_idx = torch.sort(torch.cat(val_parts)).values
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val_idx] = True
    keep_idx = torch.nonzero(~is_val).flatten()
    return keep_idx, val_idx


# ----------------------------------------------------------------------------------------------------------
# Pixel conversion
# ----------------------------------------------------------------------------------------------------------


def _uint8_view(x: torch.Tensor | np.ndarray, layout: str) -> torch.Tensor:
    """uint8 images in ``layout`` ("NHWC" | "NCHW" | "NHW") -> a uint8 [N, C, H, W] view, no copy.

    Loaders return these views; ``load_dataset`` indexes the train/val split on the uint8 data (4x fewer
    bytes to gather than float32) and only then converts, which keeps a 50k CIFAR load at a few seconds.
    """
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if layout == "NHW":
        return t.unsqueeze(1)
    if layout == "NHWC":
        return t.permute(0, 3, 1, 2)
    if layout == "NCHW":
        return t
    raise ValueError(f"unknown layout {layout!r}")


def _to_float01(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] uint8 (any strides) or float in [0, 1] -> contiguous float32 [N, C, H, W] in [0, 1].

    uint8: one allocation, one strided copy-with-cast and an in-place divide (~1 s for 50k CIFAR images).
    Dividing by 255 (not multiplying by 1/255) gives exactly the values of torchvision's ``ToTensor()``.
    """
    if x.dtype != torch.uint8:
        return x.to(torch.float32).contiguous()
    out = torch.empty(tuple(x.shape), dtype=torch.float32)
    out.copy_(x)
    return out.div_(255.0)


# ----------------------------------------------------------------------------------------------------------
# torchvision datasets
# ----------------------------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """``$MTTLSS_DATA`` if set, else ``~/.cache/mttlss/data``."""
    env = os.environ.get("MTTLSS_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/mttlss/data").expanduser()


# Where torchvision expects each dataset's files under the data root, and where it downloads them from.
_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar10": {
        "files": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
        + ["cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
        "layout": "<root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract into <root>)",
    },
    "cifar100": {
        "files": ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
        "layout": "<root>/cifar-100-python/train, test, meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract into <root>)",
    },
    "svhn": {
        "files": ["train_32x32.mat", "test_32x32.mat"],
        "layout": "<root>/train_32x32.mat, <root>/test_32x32.mat",
        "url": "http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat (save into <root>)",
    },
    "mnist": {
        "files": [f"MNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
        "layout": "<root>/MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/ (the four *-ubyte.gz files, gunzipped)",
    },
    "fashion-mnist": {
        "files": [f"FashionMNIST/raw/{f}" for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
        "layout": "<root>/FashionMNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (the four *-ubyte.gz files, gunzipped)",
    },
}


def _missing_files(name: str, root: Path) -> list[Path]:
    return [root / f for f in _LAYOUTS[name]["files"] if not (root / f).is_file()]


def _not_found_message(name: str, root: Path, *, missing: list[Path], reason: str) -> str:
    spec = _LAYOUTS[name]
    shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
    return (
        f"dataset {name!r}: {reason}.\n"
        f"  missing: {shown}\n"
        f"  expected layout: {spec['layout'].replace('<root>', str(root))}\n"
        f"  get it: load_dataset({name!r}, download=True) with network access, or download {spec['url']};\n"
        f"  choose the folder with data_root=... or the MTTLSS_DATA environment variable;\n"
        f"  or convert it to an .npz (x_train, y_train, x_test, y_test; NHWC uint8) and use 'npz:/path/file.npz'."
    )


def _torchvision_classes() -> dict[str, Callable[..., Any]]:
    """torchvision dataset classes whose integrity check is "file exists" instead of "md5 matches".

    Why: torchvision verifies every extracted CIFAR batch and SVHN .mat file against the md5 of the official
    release, so any other file in the same on-disk format (re-packed copies, the tiny files the tests write)
    is rejected as "corrupted". We keep torchvision's reading code and its download path (the downloaded
    archive is still md5-checked by ``download()``), and only relax the check of files already on disk.
    """
    from torchvision import datasets as tvd  # here for its measured cost: importing torchvision takes ~1.8 s

    class _CIFAR10(tvd.CIFAR10):
        meta = {**tvd.CIFAR10.meta, "md5": None}  # check_integrity(path, None) == "file exists"

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in
                       self.train_list + self.test_list)

    class _CIFAR100(tvd.CIFAR100):
        meta = {**tvd.CIFAR100.meta, "md5": None}

        def _check_integrity(self) -> bool:
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in
                       self.train_list + self.test_list)

    class _SVHN(tvd.SVHN):
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    # MNIST / FashionMNIST only check that the raw files exist, so the stock classes are fine.
    return {"cifar10": _CIFAR10, "cifar100": _CIFAR100, "svhn": _SVHN,
            "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}


def _load_torchvision(name: str, root: Path, download: bool | None):
    """Returns (x_train, y_train, x_test, y_test, class_names); images uint8 [N, C, H, W] views."""
    missing = _missing_files(name, root)
    if missing and download is False:
        raise DatasetError(_not_found_message(name, root, missing=missing, reason=f"files not found under {root} (download=False)"))
    cls = _torchvision_classes()[name]
    if missing:  # download is None or True here; files already present are never re-fetched
        try:
            root.mkdir(parents=True, exist_ok=True)
            if name == "svhn":
                for split in ("train", "test"):
                    cls(str(root), split=split, download=True)
            else:
                cls(str(root), train=True, download=True)
        except Exception as e:  # no network, HTTP error, bad archive, read-only folder...
            still = _missing_files(name, root)
            raise DatasetError(_not_found_message(
                name, root, missing=still or missing, reason=f"download failed ({type(e).__name__}: {e})")) from e
        missing = _missing_files(name, root)
        if missing:
            raise DatasetError(_not_found_message(name, root, missing=missing, reason="files still missing after download"))

    try:
        if name == "svhn":
            tr, te = cls(str(root), split="train"), cls(str(root), split="test")
            # .data is already [N, C, H, W]; .labels has 10 -> 0 applied by torchvision
            xs = [_uint8_view(d.data, "NCHW") for d in (tr, te)]
            ys = [torch.as_tensor(np.asarray(d.labels), dtype=torch.int64).flatten() for d in (tr, te)]
            class_names = [str(i) for i in range(10)]
        elif name in ("cifar10", "cifar100"):
            tr, te = cls(str(root), train=True), cls(str(root), train=False)
            xs = [_uint8_view(d.data, "NHWC") for d in (tr, te)]
            ys = [torch.as_tensor(np.asarray(d.targets), dtype=torch.int64) for d in (tr, te)]
            class_names = [str(c) for c in tr.classes]
        else:  # mnist, fashion-mnist: .data uint8 [N, H, W] tensor
            tr, te = cls(str(root), train=True), cls(str(root), train=False)
            xs = [_uint8_view(d.data, "NHW") for d in (tr, te)]
            ys = [d.targets.to(torch.int64) for d in (tr, te)]
            class_names = [str(i) for i in range(10)] if name == "mnist" else [str(c) for c in tr.classes]
    except DatasetError:
        raise
    except Exception as e:  # truncated pickle, wrong keys, bad idx header, ...
        raise DatasetError(
            f"dataset {name!r}: could not read the files under {root} ({type(e).__name__}: {e}).\n"
            f"  expected layout: {_LAYOUTS[name]['layout'].replace('<root>', str(root))}\n"
            f"  fix: delete the damaged files and re-download ({_LAYOUTS[name]['url']}), "
            f"or use an 'npz:/path/file.npz' copy."
        ) from e
    return xs[0], ys[0], xs[1], ys[1], class_names


# ----------------------------------------------------------------------------------------------------------
# digits, npz, folder
# ----------------------------------------------------------------------------------------------------------


def _load_digits():
    """scikit-learn's bundled 8x8 digits (no download); fixed stratified 80/20 train/test split (seed 0)."""
    from sklearn.datasets import load_digits  # here for its measured cost: ~0.9 s, paid only by digits runs

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / np.float32(16.0)).unsqueeze(1)  # [N,1,8,8]
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    train_idx, test_idx = stratified_split(y, fraction=0.2, max_count=len(y), seed=0)
    return x[train_idx].contiguous(), y[train_idx], x[test_idx].contiguous(), y[test_idx], [str(i) for i in range(10)]


_NPZ_HELP = (
    "expected an .npz with x_train, x_test as uint8 [N, H, W, C] (or [N, H, W] for grayscale) and "
    "y_train, y_test as integer [N] labels 0..K-1, optionally class_names [K] str; "
    "write one with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=..., class_names=...)"
)


def _npz_images(arr: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if arr.ndim == 3:
        layout = "NHW"
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4):
        layout = "NHWC"
    else:
        raise DatasetError(f"{path}: {key} has shape {arr.shape}; {_NPZ_HELP}")
    if arr.dtype == np.uint8:
        return _uint8_view(arr, layout)
    if np.issubdtype(arr.dtype, np.floating):  # already [0, 1] floats: accepted, but checked
        t = torch.from_numpy(arr.astype(np.float32, copy=False))
        t = t.unsqueeze(1) if layout == "NHW" else t.permute(0, 3, 1, 2)
        t = t.contiguous()
        if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
            raise DatasetError(f"{path}: float {key} must lie in [0, 1]; {_NPZ_HELP}")
        return t
    raise DatasetError(f"{path}: {key} has dtype {arr.dtype}; {_NPZ_HELP}")


def _load_npz(path: Path):
    if not path.is_file():
        raise DatasetError(f"npz dataset: file not found: {path}\n  {_NPZ_HELP}")
    if not zipfile.is_zipfile(path):  # numpy would try it as a pickle and advise allow_pickle: never do that
        raise DatasetError(f"{path} is not an .npz archive (not a zip file); {_NPZ_HELP}")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DatasetError(f"{path}: missing keys {missing} (has {sorted(f.files)}); {_NPZ_HELP}")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            names = [str(c) for c in f["class_names"].tolist()] if "class_names" in f.files else None
    except DatasetError:
        raise
    except Exception as e:  # object arrays (allow_pickle=False), truncated file...
        if "allow_pickle" in str(e):
            raise DatasetError(f"{path} holds pickled (object) arrays, which mttlss never loads because unpickling "
                               f"can run code; save plain numeric arrays instead: {_NPZ_HELP}") from e
        raise DatasetError(f"{path}: could not read as .npz ({type(e).__name__}: {e}); {_NPZ_HELP}") from e

    xs, ys = [], []
    for split in ("train", "test"):
        x = _npz_images(arrays[f"x_{split}"], f"x_{split}", path)
        y = arrays[f"y_{split}"]
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{path}: y_{split} must be integer [N] with N = {len(x)}, "
                               f"got {y.dtype} {y.shape}; {_NPZ_HELP}")
        xs.append(x)
        ys.append(torch.from_numpy(y.astype(np.int64)))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise DatasetError(f"{path}: train images {tuple(xs[0].shape[1:])} and test images "
                           f"{tuple(xs[1].shape[1:])} differ in shape; {_NPZ_HELP}")
    all_y = torch.cat(ys)
    if all_y.numel() == 0:
        raise DatasetError(f"{path}: no labels; {_NPZ_HELP}")
    if names is None:
        names = [str(i) for i in range(int(all_y.max()) + 1)]
    if int(all_y.min()) < 0 or int(all_y.max()) >= len(names):
        raise DatasetError(f"{path}: labels must lie in 0..{len(names) - 1}; {_NPZ_HELP}")
    return xs[0], ys[0], xs[1], ys[1], names


def _load_folder(root: Path):
    # here for their measured cost: importing torchvision takes ~1.8 s, paid only by folder datasets
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    help_text = (f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> "
                 "(torchvision ImageFolder layout, same class folders in both, all images one size)")
    for sub in ("train", "test"):
        if not (root / sub).is_dir():
            raise DatasetError(f"folder dataset: {root / sub} is not a directory; {help_text}")
    try:
        sets = [ImageFolder(str(root / sub)) for sub in ("train", "test")]
    except Exception as e:  # e.g. no class folders / no images
        raise DatasetError(f"folder dataset {root}: {type(e).__name__}: {e}; {help_text}") from e
    if sets[0].classes != sets[1].classes:
        raise DatasetError(f"folder dataset {root}: train classes {sets[0].classes} != test classes "
                           f"{sets[1].classes}; {help_text}")
    xs, ys = [], []
    for ds in sets:
        imgs, shape = [], None
        for path, _ in ds.samples:
            img = pil_to_tensor(ds.loader(path))  # uint8 [C, H, W]; the default loader converts to RGB
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise DatasetError(f"folder dataset {root}: {path} has shape {tuple(img.shape)} but the first "
                                   f"image has {tuple(shape)}; resize all images to one size; {help_text}")
            imgs.append(img)
        xs.append(torch.stack(imgs))  # uint8 [N, C, H, W]
        ys.append(torch.tensor(ds.targets, dtype=torch.int64))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise DatasetError(f"folder dataset {root}: train images {tuple(xs[0].shape[1:])} and test images "
                           f"{tuple(xs[1].shape[1:])} differ in size; {help_text}")
    return xs[0], ys[0], xs[1], ys[1], list(sets[0].classes)


# ----------------------------------------------------------------------------------------------------------
# The checks every dataset passes where it enters
# ----------------------------------------------------------------------------------------------------------


def _check_images(x: torch.Tensor, *, key: str, source: str) -> None:
    """[N, C, H, W] uint8, or float with finite values in [0, 1]."""
    if x.dim() != 4:
        raise DatasetError(f"{source}: {key} has shape {tuple(x.shape)}, expected images [N, C, H, W]; "
                           "store one array of equally sized images")
    if x.dtype == torch.uint8 or x.numel() == 0:
        return
    if not x.is_floating_point():
        raise DatasetError(f"{source}: {key} has dtype {x.dtype}; store images as uint8 0..255 or floats in [0, 1]")
    if not bool(torch.isfinite(x).all()):
        raise DatasetError(f"{source}: {key} holds NaN or infinite values; clean the images (e.g. numpy.nan_to_num) "
                           "and save them again")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise DatasetError(f"{source}: float {key} lies in [{float(x.min()):.4g}, {float(x.max()):.4g}], expected "
                           "[0, 1]; divide 0..255 values by 255 (or store them as uint8)")


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (at most a few runs shown)."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:6])
    return text + (", ..." if len(runs) > 6 else "")


def _check_labels(y_train: torch.Tensor, y_test: torch.Tensor, *, num_classes: int, source: str) -> None:
    """Training labels cover exactly 0..K-1 (every class has a training image), test labels lie within it."""
    present = torch.unique(y_train).tolist()
    if not present:
        raise DatasetError(f"{source}: the training split has no images; give a dataset with training images")
    if present[0] < 0 or present[-1] >= num_classes:
        raise DatasetError(f"{source}: training labels run {_ranges(present)}, outside 0..{num_classes - 1} for "
                           f"{num_classes} classes; number the classes 0..K-1 (numpy.unique(y, return_inverse=True) "
                           "does it) and give one class name per class")
    missing = sorted(set(range(num_classes)) - set(present))
    if missing:
        raise DatasetError(f"{source}: classes {_ranges(missing)} of 0..{num_classes - 1} have no training image "
                           f"(training labels: {_ranges(present)}); renumber the labels to 0..K-1 over the classes "
                           "present (numpy.unique(y, return_inverse=True)), or drop the unused class names")
    if y_test.numel() and (int(y_test.min()) < 0 or int(y_test.max()) >= num_classes):
        outside = sorted(v for v in torch.unique(y_test).tolist() if not 0 <= v < num_classes)
        raise DatasetError(f"{source}: test labels {_ranges(outside)} are not among the {num_classes} training classes "
                           f"0..{num_classes - 1}; number train and test labels alike")


def check_parts(parts: tuple, *, source: str) -> None:
    """What every loader's (x_train, y_train, x_test, y_test, class_names) must be, checked once at load: images of
    one shape and a known dtype and range, finite, one label per image, labels 0..K-1 present in training."""
    x_train, y_train, x_test, y_test, class_names = parts
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        _check_images(x, key=f"x_{split}", source=source)
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point():
            raise DatasetError(f"{source}: y_{split} must be integer labels [N] with N = {len(x)} (one per image), "
                               f"got {y.dtype} {tuple(y.shape)}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(f"{source}: train images {tuple(x_train.shape[1:])} and test images "
                           f"{tuple(x_test.shape[1:])} differ in shape; give both splits images of one shape")
    if len(set(class_names)) != len(class_names):
        raise DatasetError(f"{source}: class names repeat ({list(class_names)[:10]}); give each class its own name")
    _check_labels(y_train, y_test, num_classes=len(class_names), source=source)


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """Lower-cased built-in name with aliases resolved; ``npz:`` / ``folder:`` paths made absolute."""
    for prefix in ("npz:", "folder:"):
        if name.lower().startswith(prefix):
            return prefix + str(Path(name[len(prefix):]).expanduser().resolve())
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def load_dataset(
    name: str,
    *,
    data_root: str | None = None,
    download: bool | None = None,
    val_fraction: float = 0.1,
    val_max: int = 5000,
    split_seed: int = 0,
) -> RealData:
    """Load a dataset into memory and hold out a stratified validation split from its training set.

    ``download``: None = read from ``data_root`` and download only if files are missing; False = never
    download; True = download unless already present. ``data_root`` defaults to ``$MTTLSS_DATA`` or
    ``~/.cache/mttlss/data``. The validation split has ``min(val_max, round(val_fraction * N))`` images,
    stratified by class and drawn with ``split_seed``; ``val_fraction=0`` keeps the full training set.
    """
    cname = canonical_name(name)
    if cname.startswith("npz:"):
        parts = _load_npz(Path(cname[4:]))
    elif cname.startswith("folder:"):
        parts = _load_folder(Path(cname[7:]))
    elif cname == "digits":
        parts = _load_digits()
    elif cname in TORCHVISION_DATASETS:
        root = Path(data_root).expanduser() if data_root else default_data_root()
        parts = _load_torchvision(cname, root, download)
    else:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {_VALID_NAMES_TEXT}")
    check_parts(parts, source=cname[4:] if cname.startswith("npz:") else f"dataset {cname!r}")
    x_full, y_full, x_test, y_test, class_names = parts

    keep, val = stratified_split(y_full, fraction=val_fraction, max_count=val_max, seed=split_seed)
    # Index on the raw (usually uint8) images, then convert each split once to float32 pixel space.
    x_train = _to_float01(x_full if val.numel() == 0 else x_full[keep])
    y_train = y_full if val.numel() == 0 else y_full[keep]
    x_val, y_val = _to_float01(x_full[val]), y_full[val]
    x_test = _to_float01(x_test)
    split = {"val_fraction": float(val_fraction), "val_max": int(val_max), "split_seed": int(split_seed),
             "n_train": int(keep.numel()), "n_val": int(val.numel()), "n_test": int(len(y_test))}
    return RealData(name=cname, class_names=list(class_names), x_train=x_train, y_train=y_train,
                    x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test, split=split)


# ----------------------------------------------------------------------------------------------------------
# The manifest's dataset record, and loading the data it describes
# ----------------------------------------------------------------------------------------------------------

SPLIT_ARGS = ("val_fraction", "val_max", "split_seed")  # the keys of RealData.split that load_dataset takes


def dataset_record(data: RealData, *, data_root: str | None) -> dict:
    """The dataset entry of an experts or artifact manifest; ``load_recorded`` reads it back."""
    return {"name": data.name, "class_names": list(data.class_names), "num_classes": data.num_classes,
            "image_shape": [data.channels, *data.image_size], "split": data.split, "data_root": data_root}


def split_arguments(split: dict | None) -> dict[str, Any]:
    """``load_dataset`` keyword arguments from a split record; missing keys keep ``load_dataset``'s defaults.

    Records written before the split seed was recorded under its argument name call it ``seed``; both read.
    """
    split = dict(split or {})
    if "seed" in split:
        split.setdefault("split_seed", split.pop("seed"))
    return {k: split[k] for k in SPLIT_ARGS if k in split}


def load_recorded(record: dict, *, data_root: str | None = None, source: str = "the manifest") -> RealData:
    """The real data a manifest's dataset ``record`` was made from: same dataset, same validation split, checked
    against the record (image shape, class count) so that data which changed since says so.

    ``data_root`` overrides where the files are read (default: where the run that wrote the record read them).
    """
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise UserError(f"{source}'s dataset record has no name; pass data=load_dataset(...) explicitly")
    root = data_root if data_root is not None else record.get("data_root")
    data = load_dataset(record["name"], data_root=root, **split_arguments(record.get("split")))
    check_against_record(data, record, source=source)
    return data


def check_against_record(data: RealData, record: dict, *, source: str) -> None:
    """Refuse real data whose image shape or class count differ from what ``record`` says it was made from."""
    shape, classes = record.get("image_shape"), record.get("num_classes")
    have = [data.channels, *data.image_size]
    if (shape is not None and list(shape) != have) or (classes is not None and classes != data.num_classes):
        raise UserError(f"{source}: made from {record.get('name')!r} with {classes} classes of images {shape}, but "
                        f"{data.name!r} now has {data.num_classes} classes of images {have}; use the dataset it was "
                        "made from (the experts and artifacts of one dataset do not fit another)")


def _artifact_source(record: dict, *, dataset: str | None, data_root: str | None, source: str) -> tuple[str, str | None, bool]:
    """(dataset name, data root, whether a download may happen) for the data an artifact's ``record`` names,
    decided by what the user gave: the artifact's own name and data_root are read, never acted on."""
    expected = record.get("name")
    shape, classes = record.get("image_shape"), record.get("num_classes")
    described = f"{source} expects dataset {expected!r} ({classes} classes, images {shape})"
    if dataset is not None:
        return dataset, data_root, True  # the user named it: read (or download) as they would for experts
    if not isinstance(expected, str) or not expected:
        raise UserError(f"{source} does not say which dataset it was made from; pass --dataset NAME")
    name = canonical_name(expected)
    if name.startswith(("npz:", "folder:")):
        raise UserError(f"{described}, a path that mttlss reads only when you name it: pass --dataset {expected} to "
                        "read that file, or --dataset npz:PATH / folder:PATH for your copy of it")
    if name in TORCHVISION_DATASETS:
        root = Path(data_root).expanduser() if data_root else default_data_root()
        if data_root is None and _missing_files(name, root):
            raise UserError(f"{described}, not found under {root}; pass --data-root DIR (the folder that holds it, or "
                            f"where to download it) or --dataset npz:PATH for a copy of it")
        return name, str(root), data_root is not None  # downloads only into a folder the user named
    return name, None, False  # digits (bundled with scikit-learn), or an unknown name load_dataset refuses


def load_for_artifact(record: dict, *, dataset: str | None = None, data_root: str | None = None,
                      source: str = "the artifact", **split: Any) -> RealData:
    """The real data to evaluate or re-whiten an artifact with. An artifact is data, not a pointer: its record
    says which dataset it expects, but only ``dataset`` / ``data_root`` (the user's command line) decide which
    files are read, where, and whether anything is downloaded or created. ``split`` overrides the recorded split."""
    if not isinstance(record, dict):
        raise UserError(f"{source}'s dataset record is not a JSON object; re-create the artifact")
    name, root, may_download = _artifact_source(record, dataset=dataset, data_root=data_root, source=source)
    args = {**split_arguments(record.get("split")), **split}
    data = load_dataset(name, data_root=root, download=None if may_download else False, **args)
    check_against_record(data, record, source=source)
    return data
