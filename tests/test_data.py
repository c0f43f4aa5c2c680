"""Tests of mttlss.data: loaders (on tiny files written here), the validation split, normalisation and ZCA."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from mttlss.data import DatasetError, RealData, dataset_record, load_dataset, load_recorded, split_arguments, stratified_split
from mttlss.preprocessing import NORMALIZATION, Preprocessor

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"


# ---------------------------------------------------------------------------------------------------------
# helpers writing tiny files in the real on-disk formats
# ---------------------------------------------------------------------------------------------------------


def _rng(seed=0):
    return np.random.default_rng(seed)


def _write_pickle(path: Path, obj) -> None:
    # The official batches are Python 2 pickles with str keys; protocol 2 + str keys reads back identically
    # through torchvision's pickle.load(..., encoding="latin1").
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _fake_cifar10(root: Path, per_batch=20, n_test=20):
    rng = _rng(1)
    folder = root / "cifar-10-batches-py"
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in np.arange(per_batch) % 10]
        _write_pickle(folder / f"data_batch_{i}", {"data": x, "labels": y})
        train_x.append(x)
        train_y += y
    xt = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    _write_pickle(folder / "test_batch", {"data": xt, "labels": [int(v) for v in np.arange(n_test) % 10]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names})
    return np.concatenate(train_x), np.array(train_y), names


def _write_idx(path: Path, arr: np.ndarray) -> None:
    # MNIST idx format: magic 0x0000 08 <ndim> (08 = uint8), then big-endian uint32 dims, then the bytes.
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


# ---------------------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------------------


def test_cifar10_pickles_read_through_torchvision(tmp_path):
    train_x, train_y, names = _fake_cifar10(tmp_path)
    data = load_dataset("cifar10", data_root=str(tmp_path), download=False, val_fraction=0.2, split_seed=3)
    assert data.class_names == names and data.num_classes == 10
    assert data.channels == 3 and data.image_size == (32, 32)
    assert data.split == {"val_fraction": 0.2, "val_max": 5000, "split_seed": 3, "n_train": 80, "n_val": 20, "n_test": 20}
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.x_train.shape == (80, 3, 32, 32) and data.x_val.shape == (20, 3, 32, 32)
    assert data.x_test.shape == (20, 3, 32, 32)
    # pixel values: the pickle row is CHW-flattened uint8; check exact recovery of the kept images
    keep, _ = stratified_split(torch.from_numpy(train_y), fraction=0.2, max_count=5000, seed=3)
    expected = torch.from_numpy(train_x[keep.numpy()].reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(data.x_train, expected)
    assert torch.equal(data.y_train, torch.from_numpy(train_y[keep.numpy()]))
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0


def test_cifar100_pickles(tmp_path):
    rng = _rng(2)
    folder = tmp_path / "cifar-100-python"
    names = [f"class_{i:02d}" for i in range(100)]
    _write_pickle(folder / "train", {"data": rng.integers(0, 256, (200, 3072), dtype=np.uint8),
                                     "fine_labels": [i % 100 for i in range(200)],
                                     "coarse_labels": [i % 20 for i in range(200)]})
    _write_pickle(folder / "test", {"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8),
                                    "fine_labels": list(range(100)), "coarse_labels": [i % 20 for i in range(100)]})
    _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": [str(i) for i in range(20)]})
    data = load_dataset("cifar100", data_root=str(tmp_path), download=False, val_fraction=0.5)
    assert data.num_classes == 100 and data.class_names == names
    assert data.split["n_train"] == 100 and data.split["n_val"] == 100 and data.split["n_test"] == 100
    assert torch.equal(torch.bincount(data.y_val, minlength=100), torch.ones(100, dtype=torch.int64))


def test_svhn_mat_maps_label_10_to_0(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = _rng(3)
    digits = np.arange(30) % 10
    y_mat = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)  # SVHN stores digit 0 as 10
    x_mat = rng.integers(0, 256, size=(32, 32, 3, 30), dtype=np.uint8)  # [H, W, C, N]
    scipy_io.savemat(tmp_path / "train_32x32.mat", {"X": x_mat, "y": y_mat})
    scipy_io.savemat(tmp_path / "test_32x32.mat", {"X": x_mat[..., :10], "y": y_mat[:10]})
    data = load_dataset("svhn", data_root=str(tmp_path), download=False, val_fraction=0.0)
    assert data.class_names == [str(i) for i in range(10)]
    assert torch.equal(data.y_train, torch.from_numpy(digits).long())
    assert int(data.y_train.max()) == 9 and (data.y_train == 0).sum() == 3
    assert data.x_train.shape == (30, 3, 32, 32) and data.x_val.shape == (0, 3, 32, 32)
    # image 5, channel 1, pixel (row 2, col 7) equals X[2, 7, 1, 5] / 255
    assert data.x_train[5, 1, 2, 7].item() == pytest.approx(x_mat[2, 7, 1, 5] / 255.0)
    assert data.split["n_val"] == 0 and data.split["n_test"] == 10


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_idx_files(tmp_path, name, folder):
    rng = _rng(4)
    raw = tmp_path / folder / "raw"
    x = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    y = (np.arange(40) % 10).astype(np.uint8)
    _write_idx(raw / "train-images-idx3-ubyte", x)
    _write_idx(raw / "train-labels-idx1-ubyte", y)
    _write_idx(raw / "t10k-images-idx3-ubyte", x[:10])
    _write_idx(raw / "t10k-labels-idx1-ubyte", y[:10])
    data = load_dataset(name, data_root=str(tmp_path), download=False, val_fraction=0.25)
    assert data.channels == 1 and data.image_size == (28, 28) and data.num_classes == 10
    assert data.split["n_train"] == 30 and data.split["n_val"] == 10 and data.split["n_test"] == 10
    assert torch.equal(data.x_test[:, 0], torch.from_numpy(x[:10]).float() / 255)
    if name == "mnist":
        assert data.class_names == [str(i) for i in range(10)]


def test_npz_rgb_and_grayscale(tmp_path):
    rng = _rng(5)
    path = tmp_path / "tiny.npz"
    xtr = rng.integers(0, 256, (30, 6, 5, 3), dtype=np.uint8)  # NHWC, non-square to catch H/W swaps
    np.savez(path, x_train=xtr, y_train=np.arange(30) % 3, x_test=xtr[:6], y_test=np.arange(6) % 3,
             class_names=np.array(["a", "b", "c"]))
    data = load_dataset(f"npz:{path}", val_fraction=0.2)
    assert data.name == f"npz:{path.resolve()}"
    assert data.class_names == ["a", "b", "c"] and data.image_size == (6, 5) and data.channels == 3
    assert torch.equal(data.x_test, torch.from_numpy(xtr[:6]).permute(0, 3, 1, 2).float() / 255)
    assert data.split["n_val"] == 6 and data.x_train.is_contiguous()

    gray = tmp_path / "gray.npz"
    np.savez(gray, x_train=xtr[..., 0], y_train=np.arange(30) % 3, x_test=xtr[:4, ..., 0], y_test=np.arange(4) % 3)
    g = load_dataset(f"npz:{gray}", val_fraction=0.0)
    assert g.channels == 1 and g.image_size == (6, 5) and g.class_names == ["0", "1", "2"]


def test_npz_missing_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(DatasetError, match="x_test"):
        load_dataset(f"npz:{bad}")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_folder_of_pngs(tmp_path):
    from PIL import Image

    rng = _rng(6)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path}", val_fraction=0.25)
    assert data.class_names == ["cat", "dog"] and data.image_size == (7, 9) and data.channels == 3
    assert data.split["n_train"] == 6 and data.split["n_val"] == 2 and data.split["n_test"] == 4
    ref = torch.from_numpy(np.array(Image.open(tmp_path / "test" / "cat" / "0.png"))).permute(2, 0, 1) / 255
    assert torch.equal(data.x_test[0], ref.float())

    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "train" / "dog" / "odd.png")
    with pytest.raises(DatasetError, match="one size"):
        load_dataset(f"folder:{tmp_path}")


def test_digits():
    data = load_dataset("digits")
    assert data.channels == 1 and data.image_size == (8, 8) and data.num_classes == 10
    assert data.class_names == [str(i) for i in range(10)]
    n_total = data.split["n_train"] + data.split["n_val"] + data.split["n_test"]
    assert n_total == 1797 and data.split["n_test"] == round(0.2 * 1797)
    assert float(data.x_train.min()) == 0.0 and float(data.x_train.max()) == 1.0
    again = load_dataset("digits")
    assert torch.equal(data.x_test, again.x_test) and torch.equal(data.y_val, again.y_val)
    idx = data.class_indices("val")
    assert len(idx) == 10 and sum(len(i) for i in idx) == data.split["n_val"]
    assert all(bool((data.y_val[i] == c).all()) for c, i in enumerate(idx))


def test_missing_files_error_names_layout_and_fixes(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", data_root=str(tmp_path), download=False)
    msg = str(info.value)
    assert str(tmp_path) in msg and "cifar-10-batches-py" in msg and "data_batch_1" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg and "npz:" in msg


def test_download_failure_becomes_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match="download failed.*no network"):
        load_dataset("cifar10", data_root=str(tmp_path))  # download=None: files missing -> try download


def test_malformed_file_error(tmp_path):
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="could not read"):
        load_dataset("cifar10", data_root=str(tmp_path), download=False)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DatasetError) as info:
        load_dataset("imagenet-9000")
    msg = str(info.value)
    for name in ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "digits", "npz:", "folder:"):
        assert name in msg


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="shared cifar10.npz not present")
def test_shared_cifar10_npz_default_split():
    data = load_dataset(f"npz:{SHARED_CIFAR}")
    assert data.x_train.shape == (45000, 3, 32, 32)
    assert data.x_val.shape == (5000, 3, 32, 32) and data.x_test.shape == (10000, 3, 32, 32)
    assert torch.equal(torch.bincount(data.y_val), torch.full((10,), 500, dtype=torch.int64))
    assert data.class_names[0] == "airplane" and data.class_names[-1] == "truck"
    json.dumps(data.split)


# ---------------------------------------------------------------------------------------------------------
# validation split
# ---------------------------------------------------------------------------------------------------------


def test_stratified_split_proportions_disjoint_deterministic():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 50, 30, 20])])  # 200 images
    keep, val = stratified_split(labels, fraction=0.1, max_count=5000, seed=7)
    assert val.numel() == 20 and keep.numel() == 180
    assert torch.equal(torch.bincount(labels[val], minlength=4), torch.tensor([10, 5, 3, 2]))
    assert torch.equal(torch.sort(torch.cat([keep, val])).values, torch.arange(200))  # disjoint, complete
    assert torch.equal(keep, torch.sort(keep).values) and torch.equal(val, torch.sort(val).values)
    keep2, val2 = stratified_split(labels, fraction=0.1, max_count=5000, seed=7)
    assert torch.equal(val, val2) and torch.equal(keep, keep2)
    _, val3 = stratified_split(labels, fraction=0.1, max_count=5000, seed=8)
    assert not torch.equal(val, val3)


def test_stratified_split_cap_rounding_and_zero():
    labels = torch.arange(1000) % 3  # 334 / 333 / 333
    _, val = stratified_split(labels, fraction=0.5, max_count=100, seed=0)
    assert val.numel() == 100  # capped
    counts = torch.bincount(labels[val], minlength=3)
    assert counts.sum() == 100 and int(counts.max() - counts.min()) <= 1
    keep, val = stratified_split(labels, fraction=0.0, max_count=100, seed=0)
    assert val.numel() == 0 and torch.equal(keep, torch.arange(1000))
    with pytest.raises(ValueError):
        stratified_split(labels, fraction=1.0, max_count=10, seed=0)


# ---------------------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------------------


def test_normalize_uses_published_constants_and_inverts():
    x = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pre = Preprocessor.fit("normalize", x, dataset="cifar10")
    assert pre.space == "normalized"
    mean, std = NORMALIZATION["cifar10"]
    assert pre.meta()["mean"] == pytest.approx(list(mean)) and pre.meta()["std"] == pytest.approx(list(std))
    expected = (x[:, 1] - mean[1]) / std[1]
    assert torch.allclose(pre(x)[:, 1], expected, atol=1e-6)
    assert torch.allclose(pre.inverse(pre(x)), x, atol=1e-6)
    assert NORMALIZATION["cifar100"] == NORMALIZATION["cifar10"]


def test_normalize_computed_for_unlisted_datasets():
    x = torch.rand(50, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.2
    pre = Preprocessor.fit("normalize", x, dataset="digits")
    out = pre(x)
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std(unbiased=False)) - 1.0) < 1e-4
    assert pre.meta()["source"] == "computed"
    assert json.loads(json.dumps(pre.meta())) == pre.meta()


def test_zca_matches_kornia():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ours = Preprocessor.fit("zca", x, dataset="cifar10", eps=0.1)
    ref = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)
    ref.fit(x)
    y_ref = ref(x)
    assert ours.space == "zca" and ours.meta()["eps"] == 0.1
    assert torch.allclose(ours(x), y_ref, atol=1e-4)
    assert torch.allclose(ours.inverse(y_ref), ref.inverse_transform(y_ref), atol=1e-4)
    assert torch.allclose(ours.zca_matrix, ref.transform_matrix, atol=1e-4)


def test_zca_whitens_and_inverts_exactly():
    g = torch.Generator().manual_seed(3)
    # correlated toy data: 2000 samples of 12 features mixed by a random matrix
    z = torch.randn(2000, 12, generator=g) @ torch.randn(12, 12, generator=g)
    x = z.reshape(2000, 3, 2, 2)
    pre = Preprocessor.fit("zca", x, dataset="toy", eps=1e-6)
    w = pre(x).reshape(2000, -1).double()
    cov = torch.cov(w.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(pre.inverse(pre(x)), x, atol=1e-4 * float(x.abs().max()))
    big_eps = Preprocessor.fit("zca", x, dataset="toy", eps=0.1)
    assert torch.allclose(big_eps.inverse(big_eps(x)), x, atol=1e-4 * float(x.abs().max()))


@pytest.mark.parametrize("kind", ["normalize", "zca"])
def test_state_roundtrip_is_bit_exact(kind, tmp_path):
    from safetensors.torch import load_file, save_file

    x = torch.rand(40, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    pre = Preprocessor.fit(kind, x, dataset="npz:/some/file.npz", fitted_on="train-minus-val")
    names = set(pre.state_dict())
    assert names == ({"preprocess.mean", "preprocess.std"} if kind == "normalize"
                     else {"zca.mean", "zca.matrix", "zca.inverse"})
    save_file(pre.state_dict(), tmp_path / "s.safetensors")
    meta = json.loads(json.dumps(pre.meta()))
    restored = Preprocessor.from_state(meta, load_file(tmp_path / "s.safetensors"))
    assert restored.kind == kind and restored.space == pre.space and restored.meta() == pre.meta()
    y = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(restored(y), pre(y)) and torch.equal(restored.inverse(y), pre.inverse(y))
    if kind == "normalize":  # the JSON lists alone restore it too
        assert torch.equal(Preprocessor.from_state(meta, {})(y), pre(y))


def test_preprocessor_dtype_device_and_errors():
    x = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    pre = Preprocessor.fit("zca", x, dataset="cifar10").to("cpu")
    out = pre(x.double())
    assert out.dtype == torch.float32 and out.device == x.device
    with pytest.raises(ValueError, match="fitted on 48"):
        pre(torch.rand(2, 3, 5, 5))
    with pytest.raises(ValueError, match="kind"):
        Preprocessor.fit("pca", x, dataset="cifar10")
    with pytest.raises(ValueError, match="channels"):
        Preprocessor.fit("normalize", x[:, :1], dataset="cifar10")


def test_realdata_class_indices_and_properties():
    y = torch.tensor([0, 2, 2, 1, 0])
    d = RealData(name="toy", class_names=["a", "b", "c"], x_train=torch.zeros(5, 1, 2, 3), y_train=y,
                 x_val=torch.zeros(0, 1, 2, 3), y_val=torch.zeros(0, dtype=torch.int64),
                 x_test=torch.zeros(1, 1, 2, 3), y_test=torch.tensor([1]), split={})
    assert d.num_classes == 3 and d.channels == 1 and d.image_size == (2, 3)
    assert [t.tolist() for t in d.class_indices()] == [[0, 4], [3], [1, 2]]
    assert [t.numel() for t in d.class_indices("val")] == [0, 0, 0]


def test_load_recorded_reads_the_split_record_old_and_new():
    data = load_dataset("digits", val_fraction=0.2, val_max=100, split_seed=5)
    record = json.loads(json.dumps(dataset_record(data, data_root=None)))  # as a manifest holds it
    assert record["split"]["split_seed"] == 5 and record["name"] == "digits"
    # manifests written before the split seed was recorded under load_dataset's argument name call it "seed"
    old = {**record, "split": {("seed" if k == "split_seed" else k): v for k, v in record["split"].items()}}
    for r in (record, old):
        again = load_recorded(r)
        assert torch.equal(again.x_val, data.x_val) and torch.equal(again.y_train, data.y_train)
    assert split_arguments({"val_fraction": 0.1, "seed": 3, "n_val": 9}) == {"val_fraction": 0.1, "split_seed": 3}
    with pytest.raises(ValueError, match="no name"):
        load_recorded({"split": record["split"]})


# ---------------------------------------------------------------------------------------------------------
# every dataset is checked where it enters
# ---------------------------------------------------------------------------------------------------------


def _tiny_npz(path, *, x_train=None, y_train=None, x_test=None, y_test=None, **extra):
    rng = _rng(9)
    x = rng.integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    arrays = dict(x_train=x if x_train is None else x_train, y_train=np.arange(12) % 3 if y_train is None else y_train,
                  x_test=x[:3] if x_test is None else x_test, y_test=np.arange(3) if y_test is None else y_test)
    np.savez(path, **arrays, **extra)
    return f"npz:{path}"


@pytest.mark.parametrize("arrays, words", [
    (dict(y_train=5 + np.arange(12) % 3, y_test=np.arange(3)), ["classes 0-4 of 0..7 have no training image", "renumber"]),
    (dict(y_train=np.arange(12) % 2, y_test=np.array([0, 1, 2])), ["classes 2 of 0..2", "training labels: 0-1"]),
    (dict(y_train=np.arange(12) % 3, class_names=np.array(["a", "b", "c", "d"])), ["classes 3 of 0..3"]),
    (dict(x_train=np.full((12, 4, 4, 3), np.nan, np.float32)), ["NaN or infinite"]),
    (dict(x_train=np.full((12, 4, 4, 3), 255.0, np.float32)), ["must lie in [0, 1]"]),
    (dict(y_train=np.arange(11) % 3), ["y_train must be integer"]),
    (dict(y_train=(np.arange(12) % 3).astype(np.float32)), ["y_train must be integer"]),
    (dict(class_names=np.array(["a", "a", "b"])), ["class names repeat"]),
])
def test_npz_data_is_checked_at_load(tmp_path, arrays, words):
    name = _tiny_npz(tmp_path / "d.npz", **arrays)
    with pytest.raises(DatasetError) as info:
        load_dataset(name)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_npz_that_is_not_a_zip_or_holds_pickles_is_refused_without_pickle_advice(tmp_path):
    (tmp_path / "noise.npz").write_bytes(bytes(range(256)) * 3)
    with pytest.raises(DatasetError, match="not an .npz archive") as info:
        load_dataset(f"npz:{tmp_path / 'noise.npz'}")
    assert "allow_pickle" not in str(info.value)
    objects = np.array([{"a": 1}] * 12, dtype=object)
    name = _tiny_npz(tmp_path / "pickled.npz", y_train=objects)
    with pytest.raises(DatasetError, match="never loads") as info:
        load_dataset(name)
    assert "allow_pickle" not in str(info.value)


def test_recorded_data_that_changed_shape_is_refused(tmp_path):
    name = _tiny_npz(tmp_path / "d.npz")
    record = dataset_record(load_dataset(name), data_root=None)
    _tiny_npz(tmp_path / "d.npz", x_train=np.zeros((12, 4, 4), np.uint8), x_test=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"images \[3, 4, 4\].*now has 3 classes of images \[1, 4, 4\]"):
        load_recorded(record, source="the experts in X")


def test_an_artifacts_dataset_record_is_never_acted_on(tmp_path, monkeypatch):
    from mttlss.data import load_for_artifact

    monkeypatch.setenv("MTTLSS_DATA", str(tmp_path / "default"))
    deep = tmp_path / "some" / "deep" / "dir"
    cifar = {"name": "cifar10", "data_root": str(deep), "num_classes": 10, "image_shape": [3, 32, 32]}
    with pytest.raises(ValueError, match="expects dataset 'cifar10'.*pass --data-root DIR"):
        load_for_artifact(cifar)
    assert not deep.exists() and not (tmp_path / "default").exists()  # no folder made, nothing downloaded

    name = _tiny_npz(tmp_path / "d.npz")
    record = dataset_record(load_dataset(name), data_root=None)
    with pytest.raises(ValueError, match=f"pass --dataset {name}"):
        load_for_artifact(record)
    data = load_for_artifact(record, dataset=name)  # named by the user: read
    assert data.num_classes == 3 and data.split == load_dataset(name).split
