"""Importing reference-format experts keeps the reference's preprocessing and checks the experts' accuracy."""

import json

import numpy as np
import pytest
import torch

from mttlss import cli
from mttlss.experts import ExpertConfig, ExpertError, import_reference, train_experts
from mttlss.models import ParamLayout, build_model, model_spec
from mttlss.preprocessing import NORMALIZATION

SPEC = model_spec("convnet", width=16, depth=2)
CLASSES = 4


def _write_npz(path, *, per_class_train=60, per_class_test=25, seed=0):
    """A tiny 3x8x8 four-class set: each class a colour plus noise, sorted by class (as many npz copies are)."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.1, 0.9, size=(CLASSES, 3))

    def split(n):
        x = np.concatenate([np.clip(colours[c] + rng.normal(0, 0.15, size=(n, 8, 8, 3)), 0, 1) for c in range(CLASSES)])
        y = np.repeat(np.arange(CLASSES), n)
        return (x * 255).round().astype(np.uint8), y.astype(np.int64)

    (xtr, ytr), (xte, yte) = split(per_class_train), split(per_class_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return f"npz:{path}"


def _reference_buffer(experts_set, index):
    """The expert's trajectory as MTT's buffer.py stores it: per epoch, a list of tensors in named_parameters order."""
    layout = ParamLayout(names=tuple(n for n, _ in experts_set.manifest["parameter_layout"]),
                         shapes=tuple(tuple(s) for _, s in experts_set.manifest["parameter_layout"]))
    return [[t.clone() for t in layout.unflatten(row).values()] for row in experts_set.trajectory(index)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A buffer file written from an expert trained with the field's CIFAR-10 constants, and its dataset."""
    root = tmp_path_factory.mktemp("ref")
    dataset = _write_npz(root / "colours.npz")
    trained = train_experts(ExpertConfig(dataset=dataset, model=SPEC, num_experts=1, epochs=3, batch_size=32, dsa=False,
                                         val_fraction=0.0, normalization="cifar10"), root / "trained", progress=False)
    assert trained.preprocessor().convention == "cifar10"
    torch.save([_reference_buffer(trained, 0)], root / "replay_buffer_0.pt")
    return {"root": root, "dataset": dataset, "buffer": root / "replay_buffer_0.pt", "trained": trained}


def test_import_records_the_field_constants_and_the_accuracy_of_the_weights(reference, tmp_path):
    ex = import_reference([reference["buffer"]], tmp_path / "imported",
                          cfg=ExpertConfig(dataset=reference["dataset"], model=SPEC, val_fraction=0.0, normalization="cifar10"))
    pre = json.loads((tmp_path / "imported" / "manifest.json").read_text())["preprocessing"]
    mean, std = NORMALIZATION["cifar10"]
    assert pre["source"] == "published" and pre["convention"] == "cifar10"
    assert pre["mean"] == pytest.approx(mean) and pre["std"] == pytest.approx(std)
    # the same weights, evaluated directly with the CIFAR-10 constants applied by hand
    final = reference["trained"].trajectory(0)[-1]
    assert torch.equal(ex.trajectory(0)[-1], final)
    net = build_model(SPEC, channels=3, num_classes=CLASSES, image_size=(8, 8))
    net.load_state_dict(ParamLayout.of(net).unflatten(final))
    x = np.load(reference["root"] / "colours.npz")["x_test"]
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.from_numpy(np.load(reference["root"] / "colours.npz")["y_test"])
    with torch.no_grad():
        direct = int((net.eval()(x).argmax(1) == y).sum()) / len(y)
    check = ex.validity()[0]["check"]
    assert check["split"] == "test" and check["images"] == len(y) and check["epochs"] == [0, 3]
    assert check["acc"][-1] == pytest.approx(direct, abs=1e-9)
    assert direct > 0.5  # chance is 0.25: the check sees a trained expert as one
    assert ex.validity()[0]["imported"]["from"] == "replay_buffer_0.pt[0]"


def test_import_of_an_npz_copy_without_a_convention_says_how(reference, tmp_path):
    with pytest.raises(ExpertError, match="--normalization"):
        import_reference([reference["buffer"]], tmp_path / "imported",
                         cfg=ExpertConfig(dataset=reference["dataset"], model=SPEC, val_fraction=0.0))
    assert not (tmp_path / "imported").exists()  # failed before writing anything


def test_import_zca_is_fitted_on_the_full_training_split(reference, tmp_path):
    ex = import_reference([reference["buffer"]], tmp_path / "zca",
                          cfg=ExpertConfig(dataset=reference["dataset"], model=SPEC, val_fraction=0.1, preprocess="zca"),
                          check_images=0)
    pre = ex.preprocessor()
    assert pre.kind == "zca" and pre.eps == 0.1 and pre.fitted_on == "full-train"
    x = np.load(reference["root"] / "colours.npz")["x_train"]
    mu = (torch.from_numpy(x).permute(0, 3, 1, 2).double() / 255).reshape(len(x), -1).mean(0)
    assert torch.allclose(pre.zca_mean.double(), mu, atol=1e-6)  # all 240 training images, validation included
    assert ex.validity()[0]["check"] is None


def test_cli_import_and_info_report_instead_of_nan(reference, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli.main(["experts", "import", str(reference["buffer"]), "--dataset", reference["dataset"], "--model", "convnet",
                     "--width", "16", "--depth", "2", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "preprocessing: mean/std normalisation with the given constants: mean (0.5000, 0.5000, 0.5000)" in printed
    assert "imported from replay_buffer_0.pt[0], no training record; test accuracy (100 images): epoch 0" in printed
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "no training record" in info and "nan" not in info


def test_an_npz_copy_of_cifar10_can_use_the_field_constants_end_to_end(reference, tmp_path, capsys):
    """Experts, random baseline and DD-Ranking export of an npz copy agree with the field's CIFAR-10 constants."""
    ds = reference["dataset"]
    code = cli.main(["experts", "--dataset", ds, "--normalization", "cifar10", "--num-experts", "1", "--epochs", "1",
                     "--width", "16", "--depth", "2", "--no-dsa", "--batch-size", "64", "--out", str(tmp_path / "ex")])
    assert code == 0
    assert "with the field's cifar10 constants: mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)" in capsys.readouterr().out
    art = tmp_path / "random.safetensors"
    assert cli.main(["random", "--dataset", ds, "--ipc", "1", "--normalization", "cifar10", "--out", str(art)]) == 0
    assert cli.main(["export", str(art), "--format", "ddranking", "--out", str(tmp_path / "dd")]) == 0
    side = json.loads((tmp_path / "dd" / "export.json").read_text())
    assert side["ddranking_dataset"] == "cifar10" and side["renormalized"] is False
