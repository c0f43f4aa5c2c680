import json
import re
import time

import numpy as np
import torch
import pytest

import mttlss
from mttlss import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_budget_lowrank_cifar10(capsys):
    code, out, _ = run(capsys, "budget", "--dataset", "cifar10", "--ipc", "1", "--rank", "4", "--subspaces", "per_class")
    assert code == 0
    assert "30720 floats" in out  # 1 x 10 x 3 x 32 x 32
    # per_class subspaces, full r x r codes, r = 4: (30720 / 10 - 3 x 2 x 32 x 4) / (3 x 4 x 4) = 48 images per class
    row = next(line for line in out.splitlines() if line.strip().startswith("4 *"))
    assert row.split()[:4] == ["4", "*", "full", "48"], row
    # the default, as in distill: one subspace shared by all classes leaves room for 62 per class
    code, out, _ = run(capsys, "budget", "--dataset", "cifar10", "--ipc", "1", "--rank", "4")
    row = next(line for line in out.splitlines() if line.strip().startswith("4 *"))
    assert row.split()[:4] == ["4", "*", "full", "62"], row


def test_presets_lists_shipped(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "cifar10_ipc1_lowrank" in out.splitlines() and "config keys:" in out
    code, out, _ = run(capsys, "presets", "cifar10_ipc1_lowrank")
    assert code == 0 and json.loads(out)["param"] == "lowrank"


def test_unknown_set_key_exits_2(capsys, experts_dir, tmp_path):
    code, out, err = run(capsys, "distill", "--experts", str(experts_dir), "--ipc", "1", "--set", "lr_imgs=10",
                         "--out", str(tmp_path / "run"))
    assert code == 2
    assert "lr_imgs" in err and "valid keys" in err and "syn_steps" in err
    assert not (tmp_path / "run").exists()


def test_info_on_experts_folder(capsys, experts_dir):
    code, out, _ = run(capsys, "info", str(experts_dir))
    assert code == 0
    assert "finished experts: 2" in out and "expert   0: final val acc" in out
    assert '"epochs": 6' in out


def test_info_missing_experts_exits_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "info", str(tmp_path / "empty"))
    assert code == 2 and "manifest.json missing" in err


@pytest.fixture(scope="module")
def random_artifact(experts_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("random") / "random.safetensors"
    assert cli.main(["random", "--dataset", "digits", "--ipc", "1", "--experts", str(experts_dir), "--out", str(out)]) == 0
    return out


def test_random_artifact_has_ten_images(random_artifact, experts_dir):
    art = mttlss.load(random_artifact)
    assert art.images().shape == (10, 1, 8, 8)
    assert sorted(art.hard_labels().tolist()) == list(range(10))
    assert art.manifest["model"] == json.loads((experts_dir / "manifest.json").read_text())["model"]


def test_info_export_show_evaluate_on_artifact(capsys, random_artifact, tmp_path):
    code, out, _ = run(capsys, "info", str(random_artifact))
    assert code == 0 and "digits" in out and "10 images" in out

    code, out, _ = run(capsys, "export", str(random_artifact), "--format", "npz", "--out", str(tmp_path / "npz"))
    assert code == 0
    files = [p for p in (tmp_path / "npz").iterdir() if p.suffix == ".npz"]
    assert files
    with np.load(files[0]) as z:
        assert any(z[k].shape[0] == 10 for k in z.files)

    code, out, _ = run(capsys, "show", str(random_artifact), "--out", str(tmp_path / "grid.png"))
    assert code == 0 and (tmp_path / "grid.png").stat().st_size > 0

    code, out, _ = run(capsys, "evaluate", str(random_artifact), "--runs", "1", "--epochs", "5")
    assert code == 0
    acc = float(re.search(r"test acc ([0-9.]+)", out).group(1))
    assert 0.0 <= acc <= 100.0 and "over 1 runs" in out


def test_quickstart_fast_end_to_end(tmp_path):
    from mttlss.quickstart import quickstart

    t0 = time.time()
    report = quickstart(out=tmp_path / "qs", fast=True, progress=False)
    seconds = time.time() - t0
    saved = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    methods = {r["method"]: r for r in saved["results"]}
    assert set(methods) == {"MTT-LSS (lowrank)", "MTT (pixel)", "random real"}
    for r in methods.values():
        assert 0.0 <= r["test_acc_mean"] <= 1.0 and len(r["accs"]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["accs"])
    low = methods["MTT-LSS (lowrank)"]
    assert low["stored_floats"] <= 640 and low["images_per_class"] > 1
    assert methods["random real"]["stored_floats"] == 640
    assert (tmp_path / "qs" / "report.md").exists()
    assert seconds < 300, f"quickstart --fast took {seconds:.0f} s"


def test_export_ddranking_rewhitens_with_a_full_train_zca(capsys, tmp_path):
    art = tmp_path / "zca.safetensors"
    code, _, err = run(capsys, "random", "--dataset", "digits", "--ipc", "1", "--zca", "--out", str(art))
    assert code == 0, err
    code, out, err = run(capsys, "export", str(art), "--format", "ddranking", "--full-train-zca", "--out", str(tmp_path / "dd"))
    assert code == 0, err
    sidecar = json.loads((tmp_path / "dd" / "export.json").read_text())
    assert sidecar["zca_refit"] is True
    images = torch.load(tmp_path / "dd" / "images.pt", weights_only=True)
    original = mttlss.load(art).images()
    assert images.shape == original.shape and not torch.allclose(images, original)  # really re-whitened


def test_distill_command_keeps_the_presets_param_and_applies_overrides(capsys, tmp_path, experts_dir):
    sets = ["ipc=1", "syn_steps=3", "iterations=4", "max_start_epoch=3", "current_max_start_epoch=2",
            "expansion_end_epoch=4", "eval_every=0", "select_on=none", "grid_every=0", "batch_syn=null",
            "min_start_epoch=0", "init=real"]
    argv = ["distill", "--experts", str(experts_dir), "--preset", "cifar10_ipc1_pixel", "--out", str(tmp_path / "run")]
    for item in sets:
        argv += ["--set", item]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    art = mttlss.load(tmp_path / "run" / "synthetic.safetensors")
    assert art.manifest["synthetic"]["type"] == "pixel"  # the preset's param, not the flag's default
    assert art.manifest["config"]["syn_steps"] == 3 and art.manifest["selection"]["select_on"] == "none"
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 4
