"""Artifact file: round trip, compact soft labels, damaged and foreign files, results, header-only reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mttlss
from mttlss.artifact import ArtifactError, add_results, format_manifest, load, read_manifest, save_artifact
from mttlss.labels import compact_labels, label_stats, stored_label_bytes
from mttlss.preprocessing import Preprocessor
from mttlss.parameterization import LowRankSet, PixelSet

NUM_CLASSES, SHAPE = 3, (3, 8, 8)


def _real(seed: int = 0, n_per_class: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(NUM_CLASSES * n_per_class, *SHAPE, generator=g)  # pixel space
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    return x, y


def _pixel_set(pre):
    x, y = _real()
    return PixelSet.from_real(pre(x), y, num_classes=NUM_CLASSES, images_per_class=2,
                              generator=torch.Generator().manual_seed(1))


def _lowrank_set(pre):
    x, y = _real()
    s, _ = LowRankSet.from_real(pre(x), y, num_classes=NUM_CLASSES, images_per_class=4, rank=2,
                                generator=torch.Generator().manual_seed(1))
    return s


def _dataset():
    return {"name": "toy", "class_names": ["a", "b", "c"], "split": {"val_fraction": 0.1, "split_seed": 0}}


def _save(path, synthetic, pre, *, soft=True, **kw):
    n = synthetic.num_images
    labels = torch.randn(n, NUM_CLASSES, generator=torch.Generator().manual_seed(2)) if soft \
        else synthetic.labels_hard()
    return save_artifact(path, synthetic=synthetic, labels=labels, lr=0.0123, preprocessor=pre, dataset=_dataset(),
                         ipc=1, model={"name": "convnet", "width": 16}, config={"seed": 0}, **kw), labels


@pytest.fixture(scope="module", params=["normalize", "zca"])  # fitted once: Preprocessor is never mutated
def pre(request):
    x, _ = _real(seed=5, n_per_class=10)
    return Preprocessor.fit(request.param, x, dataset="toy")


@pytest.mark.parametrize("make", [_pixel_set, _lowrank_set], ids=["pixel", "lowrank"])
def test_round_trip_is_bit_exact(tmp_path, pre, make):
    syn = make(pre)
    path, labels = _save(tmp_path / "toy_ipc1.safetensors", syn, pre, selection={"select_on": "val",
                                                                                  "iteration": 7, "score": 0.5})
    art = mttlss.load(path)
    for k, v in syn.state_dict().items():
        assert torch.equal(art.synthetic.state_dict()[k], v), k
    assert torch.equal(art.labels, labels)
    assert art.lr == pytest.approx(0.0123, rel=1e-6)
    for k, v in pre.state_dict().items():
        assert torch.equal(art.preprocessor.state_dict()[k], v), k
    assert torch.equal(art.images(), syn.decode().detach())
    assert torch.allclose(art.images_pixels(), pre.inverse(syn.decode().detach()))
    assert art.manifest == read_manifest(path)
    m = art.manifest
    assert m["format"] == "mttlss-artifact" and m["format_version"] == 1
    assert m["dataset"]["num_classes"] == NUM_CLASSES and m["dataset"]["image_shape"] == list(SHAPE)
    assert m["synthetic"] == json.loads(json.dumps(syn.describe()))
    assert m["storage"]["stored_floats_images"] == syn.stored_floats()
    assert m["storage"]["budget_floats"] == NUM_CLASSES * 3 * 8 * 8
    assert m["storage"]["label_floats"] == labels.numel()
    stats = {"agreement", "mean_max_prob", "mean_own_prob"}  # how well the labels carry the class (labels.label_stats)
    assert {k: v for k, v in m["labels"].items() if k not in stats} == {"kind": "logits", "temperature": 1.0,
                                                                         "shape": list(labels.shape)}
    assert m["labels"]["agreement"] == float((labels.argmax(1) == syn.labels_hard()).float().mean())
    assert m["selection"] == {"select_on": "val", "iteration": 7, "score": 0.5}
    assert m["preprocessing"] == json.loads(json.dumps(pre.meta()))
    assert set(m["provenance"]) >= {"mttlss_version", "torch_version", "python", "git_revision", "argv", "created"}
    assert m["results"] == []
    # The preprocessing round trip makes the test transform reproduce the training space.
    x, _ = _real(seed=9)
    assert torch.equal(art.test_transform()(x), pre(x))
    assert art.space == pre.space


def test_targets_and_hard_labels(tmp_path, pre):
    syn = _pixel_set(pre)
    path, labels = _save(tmp_path / "soft.safetensors", syn, pre, soft=True)
    art = load(path)
    assert art.label_kind == "logits"
    t = art.targets()
    assert t.shape == (syn.num_images, NUM_CLASSES)
    assert torch.allclose(t.sum(1), torch.ones(syn.num_images))
    assert torch.equal(art.hard_labels(), labels.argmax(1))

    path, labels = _save(tmp_path / "hard.safetensors", syn, pre, soft=False)
    art = load(path)
    assert art.label_kind == "hard" and art.labels.dtype == torch.int64
    assert torch.equal(art.targets().argmax(1), labels) and torch.equal(art.targets().sum(1), torch.ones(len(labels)))
    assert art.manifest["storage"]["label_floats"] == 0
    ds = art.dataset()
    assert len(ds) == syn.num_images and torch.equal(ds.tensors[1], labels)
    assert torch.allclose(art.dataset("pixel").tensors[0], art.images_pixels())
    with pytest.raises(ValueError, match="training, pixel"):
        art.dataset("rgb")


def test_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="No artifact at .*nope.safetensors"):
        load(tmp_path / "nope.safetensors")


def test_truncated_and_garbage_files(tmp_path, pre):
    path, _ = _save(tmp_path / "a.safetensors", _pixel_set(pre), pre)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactError, match="damaged or not a safetensors file"):
        load(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a tensor file at all" * 4)
    with pytest.raises(ArtifactError, match="damaged or not a safetensors file"):
        load(garbage)
    with pytest.raises(ArtifactError, match="damaged"):
        read_manifest(garbage)


def test_foreign_safetensors_file(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="not an mttlss artifact"):
        load(foreign)
    with pytest.raises(ArtifactError, match="not an mttlss artifact"):
        read_manifest(foreign)


def test_newer_format_version_is_refused(tmp_path, pre):
    path, _ = _save(tmp_path / "a.safetensors", _pixel_set(pre), pre)
    from safetensors.torch import load_file

    m = read_manifest(path)
    m["format_version"] = 99
    save_file(load_file(str(path)), str(path), metadata={"mttlss": json.dumps(m)})
    with pytest.raises(ArtifactError, match="upgrade"):
        load(path)


def test_add_results_appends_and_keeps_tensors(tmp_path, pre):
    syn = _lowrank_set(pre)
    path, labels = _save(tmp_path / "a.safetensors", syn, pre)
    add_results(path, {"model": "convnet", "accs": [0.41, 0.43], "mean": 0.42})
    add_results(path, {"model": "resnet18", "mean": 0.3})
    m = read_manifest(path)
    assert [r["model"] for r in m["results"]] == ["convnet", "resnet18"]
    assert m["results"][0]["accs"] == [0.41, 0.43] and "recorded" in m["results"][0]
    art = load(path)
    assert torch.equal(art.labels, labels) and torch.equal(art.images(), syn.decode().detach())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files behind


def test_read_manifest_does_not_load_tensors(tmp_path, pre, monkeypatch):
    path, _ = _save(tmp_path / "a.safetensors", _pixel_set(pre), pre)
    import safetensors

    real_open = safetensors.safe_open

    class Guard:
        def __init__(self, *a, **k):
            self._f = real_open(*a, **k)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def metadata(self):
            return self._inner.metadata()

        def get_tensor(self, name):  # pragma: no cover - must not be reached
            raise AssertionError("read_manifest loaded a tensor")

    monkeypatch.setattr(safetensors, "safe_open", Guard)
    m = read_manifest(path)
    assert m["ipc"] == 1 and m["dataset"]["name"] == "toy"


def test_format_manifest_and_validation(tmp_path, pre):
    syn = _pixel_set(pre)
    path, _ = _save(tmp_path / "a.safetensors", syn, pre, extra={"seed": 3})
    add_results(path, {"mean": 0.42})
    text = format_manifest(read_manifest(path))
    assert "toy" in text and "IPC (budget)  1" in text and "1 record(s)" in text and "0.0123" in text
    assert read_manifest(path)["seed"] == 3
    with pytest.raises(ValueError, match="overwrite"):
        _save(tmp_path / "b.safetensors", syn, pre, extra={"lr": 1.0})
    with pytest.raises(ValueError, match="labels"):
        save_artifact(tmp_path / "c.safetensors", synthetic=syn, labels=torch.zeros(2, dtype=torch.long), lr=0.1,
                      preprocessor=pre, dataset=_dataset(), ipc=1)
    with pytest.raises(ValueError, match="select_on"):
        _save(tmp_path / "d.safetensors", syn, pre, selection={"select_on": "train"})


def _stored_dtypes(path) -> dict[str, str]:
    """The label tensors' dtypes as the file's own header records them (F32, F16, I16, I64): 8 bytes of header
    length, then the JSON header."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {k: v["dtype"] for k, v in header.items() if k.startswith("labels")}


@pytest.mark.parametrize("dtype, topk, file_dtypes", [
    ("float16", None, {"labels": "F16"}),
    ("float32", 2, {"labels_topk_values": "F32", "labels_topk_index": "I16"}),
    ("float16", 1, {"labels_topk_values": "F16", "labels_topk_index": "I16"}),
])
def test_compact_labels_are_stored_compactly_and_load_as_compact_labels_gives(tmp_path, pre, dtype, topk, file_dtypes):
    syn = _lowrank_set(pre)
    path, labels = _save(tmp_path / "a.safetensors", syn, pre, label_dtype=dtype, label_topk=topk)
    assert _stored_dtypes(path) == file_dtypes
    art = load(path)
    assert art.labels.dtype == torch.float32 and art.labels.shape == (syn.num_images, NUM_CLASSES)
    assert torch.equal(art.labels, compact_labels(labels, dtype=dtype, topk=topk))  # the round trip, bit for bit
    assert not torch.equal(art.labels, labels)
    st, n = art.manifest["storage"], syn.num_images
    assert st["label_bytes"] == n * stored_label_bytes(num_classes=NUM_CLASSES, dtype=dtype, topk=topk)
    assert (st["label_floats"], st["label_dtype"], st["label_topk"]) == (st["label_bytes"] / 4, dtype, topk)
    assert st["stored_floats_with_labels"] == syn.stored_floats() + st["label_floats"]
    assert art.manifest["labels"]["mean_own_prob"] == pytest.approx(
        label_stats(art.labels, syn.labels_hard())["mean_own_prob"], abs=1e-7)  # the labels as stored
    assert f"{dtype}, {f'top-{topk}' if topk else 'all classes'}, {st['label_bytes']} bytes" in format_manifest(art.manifest)
    add_results(path, {"mean": 0.5})  # rewriting the file keeps the compact form
    assert _stored_dtypes(path) == file_dtypes and torch.equal(load(path).labels, art.labels)


def test_an_artifact_with_float32_labels_from_before_compact_storage_loads(tmp_path, pre):
    syn = _pixel_set(pre)
    path, labels = _save(tmp_path / "new.safetensors", syn, pre)
    assert _stored_dtypes(path) == {"labels": "F32"}  # the default stores what older versions stored
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["mttlss"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("label_bytes", "label_dtype", "label_topk"):
        del manifest["storage"][key]  # what an older mttlss wrote
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"mttlss": json.dumps(manifest)})
    art = load(old)
    assert art.label_kind == "logits" and torch.equal(art.labels, labels)
    assert f"{labels.numel()} in labels; " in format_manifest(art.manifest)


def test_damaged_topk_labels_are_refused(tmp_path, pre):
    path, _ = _save(tmp_path / "a.safetensors", _pixel_set(pre), pre, label_topk=1)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["labels_topk_index"][0, 0] = NUM_CLASSES  # a class that does not exist
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ArtifactError, match="stored labels are damaged"):
        load(path)
    del tensors["labels_topk_index"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ArtifactError, match="tensor 'labels' is missing"):
        load(path)
