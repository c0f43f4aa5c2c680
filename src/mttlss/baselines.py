"""Baselines at the same storage: IPC random real images per class, written as an ordinary artifact so the
same `mttlss evaluate` command measures them."""

from __future__ import annotations

from pathlib import Path

import torch

from mttlss.data import Preprocessor, RealData, load_dataset
from mttlss.models import model_spec as make_model_spec
from mttlss.parameterization import PixelSet

RANDOM_LR = 0.01  # the evaluation lr the field uses for real-image baselines (no learned step size exists)


def random_real_set(data: RealData, pre: Preprocessor, *, ipc: int, seed: int = 0) -> PixelSet:
    """IPC random training images per class (never validation or test images), in training space."""
    gen = torch.Generator().manual_seed(seed)
    return PixelSet.from_real(pre(data.x_train), data.y_train, num_classes=data.num_classes, images_per_class=ipc, generator=gen)


def random_real_artifact(*, dataset: str, ipc: int, out: str | Path, data_root: str | None = None,
                         experts: str | Path | None = None, seed: int = 0, zca: bool = False,
                         data: RealData | None = None) -> Path:
    """Write an artifact of random real images; with ``experts``, reuse their split, preprocessing and model
    so the baseline is evaluated exactly like the distilled sets."""
    from mttlss.artifact import save_artifact

    if experts is not None:
        from mttlss.experts import ExpertSet

        ex = ExpertSet(experts)
        split = ex.dataset["split"]
        data = data or load_dataset(ex.dataset["name"], data_root=data_root or ex.dataset.get("data_root"),
                                    val_fraction=split["val_fraction"], val_max=split["val_max"], split_seed=split["seed"])
        pre, spec = ex.preprocessor(), ex.model
        data_root = data_root or ex.dataset.get("data_root")
    else:
        data = data or load_dataset(dataset, data_root=data_root)
        pre = Preprocessor.fit("zca" if zca else "normalize", data.x_train, dataset=dataset)
        spec = make_model_spec("convnet")
    syn = random_real_set(data, pre, ipc=ipc, seed=seed)
    info = {"name": data.name, "class_names": list(data.class_names), "num_classes": data.num_classes,
            "image_shape": [data.channels, *data.image_size], "split": data.split, "data_root": data_root}
    return save_artifact(out, synthetic=syn, labels=syn.labels_hard(), lr=RANDOM_LR, preprocessor=pre, dataset=info, ipc=ipc,
                         model=spec, selection={"select_on": "none", "iteration": None, "score": None},
                         config={"method": "random-real", "ipc": ipc, "seed": seed}, extra={"method": "random-real"})
