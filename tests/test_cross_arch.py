"""benchmarks/cross_arch.py on tiny sets: one cell per set x network, accuracies in [0, 1], each network's spec
recorded (the set's own ConvNet options for convnet, registry defaults for the others), the cpu scale's runs and
its cut said, a rerun reusing the finished cells."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mttlss.artifact import save_artifact
from mttlss.baselines import random_real_set
from mttlss.data import dataset_record, load_dataset
from mttlss.parameterization import LowRankSet
from mttlss.preprocessing import Preprocessor

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cross_arch  # noqa: E402

OWN = {"name": "convnet", "width": 8, "depth": 2}  # the tiny sets' own network (the benchmark's: width 32, depth 3)
SETS = "benchmarks/out/cifar10/cpu/ipc1/{}/synthetic.safetensors"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class 3x8x8 npz and the four CIFAR-10 benchmark folders of IPC 1 under a fake checkout root."""
    tmp = tmp_path_factory.mktemp("cross_arch")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (66, 8, 8, 3), dtype=np.uint8)
    y = np.arange(66) % 3
    npz = tmp / "tiny.npz"
    np.savez(npz, x_train=x[:54], y_train=y[:54], x_test=x[54:], y_test=y[54:])
    data = load_dataset(f"npz:{npz}")
    pre = Preprocessor.fit("normalize", data.x_train, dataset=data.name)
    root = tmp / "checkout"
    for seed, method in enumerate(("random", "pixel", "lowrank_init_soft", "lowrank")):
        if method in ("random", "pixel"):  # one real image per class, hard labels
            s = random_real_set(data, pre, ipc=1, seed=seed)
            labels = s.labels_hard()
        else:  # 4 re-coded images per class in the same storage, soft labels (logits), as the benchmark's
            s, _ = LowRankSet.from_real(pre(data.x_train), data.y_train, num_classes=3, images_per_class=4, rank=2,
                                        generator=torch.Generator().manual_seed(seed))
            labels = 3.0 * torch.nn.functional.one_hot(s.labels_hard(), 3).float()
        save_artifact(root / SETS.format(method), synthetic=s, labels=labels, lr=0.01, preprocessor=pre,
                      dataset=dataset_record(data, data_root=None), ipc=1, model=OWN,
                      selection={"select_on": "none", "iteration": None, "score": None}, config={"method": method})
    return root, npz, tmp


def run(tiny, capsys, *extra):
    root, npz, tmp = tiny
    argv = ["--root", str(root), "--data", str(npz), "--models", "convnet", "resnet18_bn", "--epochs", "2",
            "--out", str(tmp / "out"), *extra]
    assert cross_arch.main(argv) == 0
    printed = capsys.readouterr().out
    return json.loads((tmp / "out" / "results.json").read_text()), (tmp / "out" / "results.md").read_text(), printed


def test_one_cell_per_set_and_network_with_specs_runs_and_cut(tiny, capsys):
    report, table, printed = run(tiny, capsys)
    cells = report["cells"]
    assert [(c["method"], c["model"]) for c in cells] == [(m, n) for m in cross_arch.METHODS
                                                         for n in ("convnet", "resnet18_bn")]
    for c in cells:
        assert len(c["accs"]) == {"convnet": 3, "resnet18_bn": 1}[c["model"]]  # cpu scale: 1 run but convnet's
        assert all(0.0 <= a <= 1.0 for a in c["accs"]) and c["seeds"] == list(range(len(c["accs"])))
        assert c["ipc"] == 1 and c["seconds"] >= 0 and c["lr"] == pytest.approx(0.01)
        # convnet is the set's own network (its width and depth), ResNet-18 its registry defaults: no width
        assert c["model_spec"] == (OWN if c["model"] == "convnet" else {"name": "resnet18_bn", "norm": "batchnorm"})
    assert {c["method"]: c["images_per_class"] for c in cells} == {"random": 1, "pixel": 1, "lowrank_init_soft": 4,
                                                                   "lowrank": 4}
    assert report["models"] == ["convnet", "resnet18_bn"] and report["runs"] == {"convnet": 3, "resnet18_bn": 1}
    assert report["recipe"]["epochs"] == 2 and report["recipe"]["name"] == "bench-300@2ep"
    assert report["recipe"]["epoch_mode"] == "budget" and report["recipe"]["batch_size"] == 128
    assert report["cut"] == ("IPC 1 only (the benchmark has 1 and 10); 1 network per cell instead of 3 for resnet18_bn; "
                             "2 epochs instead of 300 (a smoke check)")
    assert report["machine"]["cpu"] and report["machine"]["torch"] and report["machine"]["torch_threads"] >= 1
    rows = [line for line in table.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 4 and all(row.count(" s) |") == 2 for row in rows)
    assert "| convnet (width 8, depth 2, 3 runs) | resnet18_bn (norm batchnorm, 1 run) |" in table
    assert f"cut from the benchmark: {report['cut']}" in table and report["machine"]["cpu"] in table
    assert "| 1 | random real | 1 |" in table and "| 1 | MTT-LSS | 4 |" in table
    assert f"cut: {report['cut']}" in printed and "estimated" in printed


def test_rerun_reuses_finished_cells_and_a_changed_setting_does_not(tiny, capsys):
    first, _, _ = run(tiny, capsys)
    again, _, printed = run(tiny, capsys)
    assert "kept from an earlier run: 8 of 8 cells" in printed
    assert [c["accs"] for c in again["cells"]] == [c["accs"] for c in first["cells"]]
    other, _, printed = run(tiny, capsys, "--methods", "random", "--runs", "2")  # other runs: evaluated afresh
    assert "kept from an earlier run: " not in printed and all(len(c["accs"]) == 2 for c in other["cells"])
    assert "2 networks per cell instead of 3 for convnet, resnet18_bn" in other["cut"]  # what was run, said
    assert other["cells"][0]["accs"] == first["cells"][0]["accs"][:2]  # the same seeds: seeded, deterministic


def test_a_missing_set_names_the_command_that_makes_it(tiny, capsys):
    root, npz, tmp = tiny
    with pytest.raises(SystemExit, match=r"ipc10.*cifar10.py --ipcs 10"):
        cross_arch.main(["--root", str(root), "--data", str(npz), "--ipcs", "10", "--out", str(tmp / "x")])


def test_training_images_and_estimate_follow_the_budget_recipe():
    recipe = cross_arch.bench.eval_recipe(cross_arch.bench.plan_for("cpu", expert_epochs=None, smoke=False))
    # 300 budget epochs of one step: batch 128 for a 620-image MTT-LSS set, all 10 images of a pixel set
    assert cross_arch.train_images(recipe, n=620, ipc=1, num_classes=10) == 300 * 128
    assert cross_arch.train_images(recipe, n=10, ipc=1, num_classes=10) == 300 * 10
    cell = {"model": "resnet18_bn", "recipe": recipe, "n": 620, "ipc": 1, "runs": 1}
    assert cross_arch.estimate_seconds(cell, n_test=10000, num_classes=10) == pytest.approx(38.4 * 73.0 + 266.0)
    assert cross_arch.estimate_seconds({**cell, "model": "convnet_d2"}, n_test=10000, num_classes=10) is None
