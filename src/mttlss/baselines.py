"""Baselines at the same storage: IPC random real images per class, written as an ordinary artifact so the
same `mttlss evaluate` command measures them."""

from __future__ import annotations

from pathlib import Path

import torch

from mttlss.artifact import save_artifact
from mttlss.data import RealData, canonical_name, dataset_record, load_dataset, load_recorded
from mttlss.errors import UserError
from mttlss.experts import ExpertSet
from mttlss.models import model_spec as make_model_spec
from mttlss.parameterization import PixelSet
from mttlss.preprocessing import Preprocessor

RANDOM_LR = 0.01  # the evaluation lr the field uses for real-image baselines (no learned step size exists)


def random_real_set(data: RealData, pre: Preprocessor, *, ipc: int, seed: int = 0) -> PixelSet:
    """IPC random training images per class (never validation or test images), in training space."""
    gen = torch.Generator().manual_seed(seed)
    return PixelSet.from_real(pre(data.x_train), data.y_train, num_classes=data.num_classes, images_per_class=ipc, generator=gen)


def _check_same_dataset(dataset: str | None, experts: ExpertSet) -> None:
    """The --dataset of a baseline that reuses an experts folder must be the experts' own."""
    if dataset and canonical_name(dataset) != experts.dataset["name"]:
        raise UserError(f"--dataset {dataset} is not the dataset the experts in {experts.folder} were trained on "
                        f"({experts.dataset['name']}); pass --dataset {experts.dataset['name']}, or drop --experts")


def random_real_artifact(*, dataset: str, ipc: int, out: str | Path, data_root: str | None = None,
                         experts: str | Path | None = None, seed: int = 0, zca: bool = False,
                         data: RealData | None = None, normalization: str | None = None) -> Path:
    """Write an artifact of random real images; with ``experts``, reuse their split, preprocessing and model
    so the baseline is evaluated exactly like the distilled sets."""
    if experts is not None:
        ex = ExpertSet(experts)
        _check_same_dataset(dataset, ex)
        data_root = data_root or ex.dataset.get("data_root")
        data = data or load_recorded(ex.dataset, data_root=data_root, source=f"the experts in {ex.folder}")
        pre, spec = ex.preprocessor(), ex.model
    else:
        data = data or load_dataset(dataset, data_root=data_root)
        pre = Preprocessor.fit("zca" if zca else "normalize", data.x_train, dataset=dataset, normalization=normalization)
        spec = make_model_spec("convnet")
    syn = random_real_set(data, pre, ipc=ipc, seed=seed)
    return save_artifact(out, synthetic=syn, labels=syn.labels_hard(), lr=RANDOM_LR, preprocessor=pre,
                         dataset=dataset_record(data, data_root=data_root), ipc=ipc, model=spec,
                         selection={"select_on": "none", "iteration": None, "score": None},
                         config={"method": "random-real", "ipc": ipc, "seed": seed}, extra={"method": "random-real"})
