"""Exports (ddranking trio, imagefolder, npz) and pictures (grid, low-rank figures, curves)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mttlss.artifact import load, save_artifact
from mttlss.preprocessing import Preprocessor
from mttlss.export import export
from mttlss.parameterization import LowRankSet, PixelSet
from mttlss.viz import plot_curves, save_grid, show_artifact

NUM_CLASSES, SHAPE = 3, (3, 8, 8)
NAMES = ["cat", "dog", "a/b"]  # a name with a path separator must still give one folder


def _real(seed: int, n_per_class: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(NUM_CLASSES * n_per_class, *SHAPE, generator=g)  # pixel space
    return x, torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)


@functools.lru_cache(maxsize=None)
def _fit(kind: str) -> Preprocessor:  # fitted once per kind (never mutated): keeps the tests fast
    return Preprocessor.fit(kind, _real(0)[0][:-2], dataset="toy")  # "train minus val"


def _artifact(tmp_path, *, kind="zca", lowrank=True, soft=True, name="a.safetensors"):
    x, y = _real(0)
    pre = _fit(kind)
    if lowrank:
        syn, _ = LowRankSet.from_real(pre(x), y, num_classes=NUM_CLASSES, images_per_class=4, rank=2,
                                      generator=torch.Generator().manual_seed(1))
    else:
        syn = PixelSet.from_real(pre(x), y, num_classes=NUM_CLASSES, images_per_class=2,
                                 generator=torch.Generator().manual_seed(1))
    n = syn.num_images
    labels = torch.randn(n, NUM_CLASSES, generator=torch.Generator().manual_seed(2)) if soft else syn.labels_hard()
    path = save_artifact(tmp_path / name, synthetic=syn, labels=labels, lr=0.02, preprocessor=pre,
                         dataset={"name": "toy", "class_names": NAMES}, ipc=1)
    return load(path), x


def test_ddranking_trio(tmp_path):
    art, _ = _artifact(tmp_path)
    out = tmp_path / "dd"
    files = export(art, fmt="ddranking", out_dir=out)
    assert {p.name for p in files} == {"images.pt", "labels.pt", "lr.pt", "export.json"}
    images = torch.load(out / "images.pt", weights_only=True)
    labels = torch.load(out / "labels.pt", weights_only=True)
    lr = torch.load(out / "lr.pt", weights_only=True)
    assert images.dtype == torch.float32 and images.shape == (12, *SHAPE)
    assert torch.equal(images, art.images())  # no full-train ZCA given: exported as is
    assert labels.dtype == torch.float32 and labels.shape == (12, NUM_CLASSES)
    assert lr.dim() == 0 and lr.dtype == torch.float32 and lr.item() == pytest.approx(0.02)
    side = json.loads((out / "export.json").read_text())
    assert side["storage_ipc"] == 1 and side["images_per_class"] == 4 and side["ipc_to_pass"] == 4
    assert "ipc = 4" in side["note"]
    assert side["space"] == "zca" and side["label_kind"] == "logits" and side["zca_refit"] is False
    assert side["zca_fitted_on"] == "train-minus-val" and "full_train_preprocessor" in side["space_note"]
    assert side["source_artifact"].endswith("a.safetensors")


def test_ddranking_refits_zca_and_accepts_a_path(tmp_path):
    art, x = _artifact(tmp_path, soft=False)
    full = Preprocessor.fit("zca", x, dataset="toy", fitted_on="train")
    out = tmp_path / "dd"
    export(str(art.path), fmt="ddranking", out_dir=out, full_train_preprocessor=full)
    images = torch.load(out / "images.pt", weights_only=True)
    assert torch.allclose(images, full(art.images_pixels()), atol=1e-5)
    assert not torch.allclose(images, art.images(), atol=1e-3)  # the re-whitening changed something
    labels = torch.load(out / "labels.pt", weights_only=True)
    assert labels.dtype == torch.int64 and labels.shape == (12,)
    side = json.loads((out / "export.json").read_text())
    assert side["zca_refit"] is True and side["label_kind"] == "hard"


def test_unknown_format(tmp_path):
    art, _ = _artifact(tmp_path, lowrank=False)
    with pytest.raises(ValueError, match="ddranking, imagefolder, npz"):
        export(art, fmt="png", out_dir=tmp_path / "x")


@pytest.mark.parametrize("kind", ["normalize", "zca"])
def test_imagefolder(tmp_path, kind):
    art, _ = _artifact(tmp_path, kind=kind)
    out = tmp_path / "folder"
    export(art, fmt="imagefolder", out_dir=out)
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == NUM_CLASSES
    expected = (art.images_pixels().clamp(0, 1) * 255).round().to(torch.uint8)
    for d in dirs:
        pngs = sorted(d.glob("*.png"))
        assert len(pngs) == 4
        for p in pngs:
            img = Image.open(p)
            assert img.size == (8, 8) and img.mode == "RGB"
            idx = int(p.stem)
            assert np.array_equal(np.asarray(img), expected[idx].permute(1, 2, 0).numpy())
    assert (out / "a_b").is_dir() and (out / "cat" / "00000.png").is_file()


def test_imagefolder_grayscale(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 5, 5, generator=g)
    y = torch.arange(2).repeat_interleave(3)
    pre = Preprocessor.fit("normalize", x, dataset="toy")
    syn = PixelSet.from_real(pre(x), y, num_classes=2, images_per_class=2, generator=g)
    path = save_artifact(tmp_path / "g.safetensors", synthetic=syn, labels=syn.labels_hard(), lr=0.1,
                         preprocessor=pre, dataset={"name": "toy", "class_names": ["x", "y"]}, ipc=1)
    export(path, fmt="imagefolder", out_dir=tmp_path / "f")
    img = Image.open(tmp_path / "f" / "y" / "00003.png")
    assert img.mode == "L" and img.size == (5, 5)


def test_npz(tmp_path):
    art, _ = _artifact(tmp_path)
    files = export(art, fmt="npz", out_dir=tmp_path / "n")
    with np.load(files[0], allow_pickle=False) as z:
        assert z["images_pixels"].shape == (12, 8, 8, 3) and z["images_pixels"].dtype == np.float32
        assert z["images_training"].shape == (12, *SHAPE)
        assert np.array_equal(z["images_training"], art.images().numpy())
        assert np.allclose(z["images_pixels"], art.images_pixels().permute(0, 2, 3, 1).numpy())
        assert z["labels"].shape == (12, NUM_CLASSES)
        assert np.array_equal(z["hard_labels"], art.hard_labels().numpy())
        assert list(z["class_names"]) == NAMES
        assert z["lr"].shape == () and float(z["lr"]) == pytest.approx(0.02)


def test_save_grid_pixel_size_and_clip(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(7, 3, 6, 5, generator=g) * 1.4 - 0.2  # pixel space, partly outside [0, 1]
    hard = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    path = save_grid(images, hard, ["a", "b", "c"], tmp_path / "grid.png", max_per_class=2, upscale=3)
    img = Image.open(path)
    # cols = 2, rows = 3, padding 2: width 2 + 2*(5*3+2), height 2 + 3*(6*3+2)
    assert img.size == (2 + 2 * (15 + 2), 2 + 3 * (18 + 2)) and img.mode == "RGB"
    arr = np.asarray(img)
    expected = (images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(arr[2:20:3, 2:17:3], expected)  # nearest-neighbour upscale of the first image
    clipped = np.asarray(Image.open(save_grid(images, hard, ["a", "b", "c"], tmp_path / "c.png", clip_sigma=2.5)))
    cell = clipped[2:26, 2:22]  # first image, upscale 4
    assert cell.min() == 0 and cell.max() == 255  # stretched to the full range


def test_show_artifact_lowrank_and_pixel(tmp_path):
    art, _ = _artifact(tmp_path)
    files = show_artifact(art, tmp_path / "show" / "toy.png")
    names = sorted(p.name for p in files)
    assert names == ["toy.png", "toy_clipped.png", "toy_codes.png", "toy_mappers.png"]
    for p in files:
        assert Image.open(p).size[0] > 0
    art, _ = _artifact(tmp_path, lowrank=False, name="p.safetensors")
    assert [p.name for p in show_artifact(art, tmp_path / "p.png")] == ["p.png", "p_clipped.png"]


def test_plot_curves(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"iteration": i, "loss": 1.0 / (i + 1), "lr": 0.01 + i * 1e-4,
                         **({"val_acc": 0.1 * i} if i % 5 == 0 else {})}) for i in range(30)]
    log.write_text("\n".join(lines) + "\n")
    out = plot_curves(log, tmp_path / "curves.png")
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{\"iteration\": 1, \"lo")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        plot_curves(bad, tmp_path / "x.png")


def test_ddranking_renormalises_mean_std_images_to_its_cifar_constants(tmp_path):
    from mttlss.export import DDRANKING_NORMALIZATION

    art, _ = _artifact(tmp_path, kind="normalize")  # "toy": mean/std computed from the images
    export(art, fmt="ddranking", out_dir=tmp_path / "plain")
    side = json.loads((tmp_path / "plain" / "export.json").read_text())
    assert side["ddranking_dataset"] is None and side["renormalized"] is False and "--as-dataset" in side["space_note"]
    assert torch.equal(torch.load(tmp_path / "plain" / "images.pt", weights_only=True), art.images())

    export(art, fmt="ddranking", out_dir=tmp_path / "c10", as_dataset="cifar10")
    images = torch.load(tmp_path / "c10" / "images.pt", weights_only=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in DDRANKING_NORMALIZATION["cifar10"])
    assert torch.allclose(images * std + mean, art.images_pixels(), atol=1e-5)  # the same pixels, DD-Ranking's constants
    assert not torch.allclose(images, art.images(), atol=1e-3)
    assert json.loads((tmp_path / "c10" / "export.json").read_text())["renormalized"] is True

    # an artifact that recorded the field's convention is already in DD-Ranking's space
    pre = Preprocessor.fit("normalize", _real(0)[0], dataset="npz:/x/cifar10.npz", normalization="cifar10")
    x, y = _real(0)
    syn = PixelSet.from_real(pre(x), y, num_classes=NUM_CLASSES, images_per_class=2, generator=torch.Generator().manual_seed(1))
    path = save_artifact(tmp_path / "conv.safetensors", synthetic=syn, labels=syn.labels_hard(), lr=0.02, preprocessor=pre,
                         dataset={"name": "npz:/x/cifar10.npz", "class_names": NAMES}, ipc=2)
    export(str(path), fmt="ddranking", out_dir=tmp_path / "conv")
    side = json.loads((tmp_path / "conv" / "export.json").read_text())
    assert side["ddranking_dataset"] == "cifar10" and side["renormalized"] is False
    assert torch.equal(torch.load(tmp_path / "conv" / "images.pt", weights_only=True), load(path).images())
