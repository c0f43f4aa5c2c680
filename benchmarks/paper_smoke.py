"""The paper protocol on tiny data: every stage of ``benchmarks/cifar10.py --scale paper`` with the shipped presets,
in about a minute on a CPU, so that a GPU session does not spend its minutes on a crash a CPU could have found.

    python benchmarks/paper_smoke.py                          # CIFAR-10, CIFAR-100, SVHN; pixel + lowrank at IPC 1
    python benchmarks/paper_smoke.py --datasets svhn --ipcs 1 10 --out /tmp/paper_smoke

Per dataset it writes a tiny copy in torchvision's on-disk layout (``cifar-10-batches-py/``, ``cifar-100-python/``,
``train_32x32.mat``: a few random 3x32x32 images per class), then runs the paper plan's stages on it: 2 experts
of the paper's model (ConvNet-3 width 128) with the paper's preprocessing (ZCA for CIFAR, mean/std for SVHN), the
random-real baseline, pixel MTT and MTT-LSS from ``resolve_config(preset=<dataset>_ipc<k>_<param>)``, the test
evaluation, the artifacts, ``results.json`` and the README table (``markdown``). The numbers mean nothing.

What is cut, and nothing else (``CUTS``, ``EXPERT_CUTS``, ``EVAL_CUTS``): the data, the experts' count and epochs,
the iterations, syn_steps, batch_syn, the validation and test evaluations' sizes, and the matching window
(T-, T_cur, T+, M shrunk to 2-epoch experts by ``cifar10.fit_window``). ZCA / normalisation, DSA, labels, param,
rank, code, subspaces, learning rates, thresholds, init and the progressive schedule's switch are the preset's.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10 as bench  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

DATASETS = {  # classes, and the preprocessing the presets name (method.md 10.1)
    "cifar10": {"classes": 10, "preprocess": "zca"},
    "cifar100": {"classes": 100, "preprocess": "zca"},
    "svhn": {"classes": 10, "preprocess": "normalize"},
}
PER_CLASS = {"train": 2, "test": 1}  # images per class in the tiny copies (the validation split takes one of the two)
EXPERT_CUTS = {"num_experts": 2, "epochs": 2}
EVAL_CUTS = {"runs": 1, "epochs": 1, "batch_size": 10, "epoch_mode": "budget"}  # budget: IPC x classes images an epoch
# DistillConfig keys set over every preset (the rest of each preset is kept as shipped); the lowrank sets also decode
# at most LOWRANK_IMAGES images per class (~60 at IPC 1 otherwise: 6,000 for CIFAR-100, minutes of label scoring)
CUTS = {"syn_steps": 2, "batch_syn": 10, "eval_every": 2, "eval_epochs": 1, "eval_runs": 1, "eval_epoch_mode": "budget",
        "eval_batch_size": 10, "grid_every": 2, "checkpoint_every": 1}
LOWRANK_IMAGES = 4
ITERATIONS = 2
METHODS = [m for m in bench.METHODS if m[1] in ("pixel", "lowrank")]  # pixel MTT and MTT-LSS, labels=auto


# ---------------------------------------------------------------------------------------------------------
# tiny copies in torchvision's layouts (the writers of tests/test_data.py)


def _images(rng, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # [N, C*H*W] rows, as CIFAR pickles store them


def _labels(classes: int, per_class: int) -> list[int]:
    return [i % classes for i in range(classes * per_class)]


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar10(root: Path, rng) -> None:
    folder, labels = root / "cifar-10-batches-py", np.array(_labels(10, PER_CLASS["train"]))
    for i, part in enumerate(np.array_split(labels, 5), start=1):  # five batches share the training images
        _pickle(folder / f"data_batch_{i}", {"data": _images(rng, len(part)), "labels": [int(c) for c in part]})
    _pickle(folder / "test_batch", {"data": _images(rng, 10 * PER_CLASS["test"]), "labels": _labels(10, PER_CLASS["test"])})
    _pickle(folder / "batches.meta", {"label_names": [f"class_{c}" for c in range(10)]})


def write_cifar100(root: Path, rng) -> None:
    folder = root / "cifar-100-python"
    for split, per in (("train", PER_CLASS["train"]), ("test", PER_CLASS["test"])):
        fine = _labels(100, per)
        _pickle(folder / split, {"data": _images(rng, len(fine)), "fine_labels": fine, "coarse_labels": [c % 20 for c in fine]})
    _pickle(folder / "meta", {"fine_label_names": [f"class_{c:02d}" for c in range(100)],
                              "coarse_label_names": [str(c) for c in range(20)]})


def write_svhn(root: Path, rng) -> None:
    from scipy import io as scipy_io

    for split, per in (("train", PER_CLASS["train"]), ("test", PER_CLASS["test"])):
        digits = np.array(_labels(10, per))
        y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)  # SVHN stores digit 0 as 10
        x = rng.integers(0, 256, size=(32, 32, 3, len(digits)), dtype=np.uint8)  # [H, W, C, N]
        scipy_io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn}


def write_tiny(name: str, root: Path, seed: int = 0) -> Path:
    """A tiny copy of ``name`` in torchvision's layout under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    WRITERS[name](root, np.random.default_rng(seed))
    return root


# ---------------------------------------------------------------------------------------------------------
# the plan and the run


def smoke_plan(name: str, root: Path, ipcs: list[int]) -> dict:
    """The paper plan for ``name``'s presets, with only the sizes cut (the module docstring lists them)."""
    plan = copy.deepcopy(bench.SCALES["paper"])
    plan.pop("exact_window")  # 2-epoch experts: the window shrinks to fit (cifar10.fit_window)
    plan["dataset"] = {"dataset": name, "data_root": str(root), "val_fraction": 0.5}  # one of each class's two images
    plan["experts"].update(EXPERT_CUTS, preprocess=DATASETS[name]["preprocess"])
    plan["eval"].update(EVAL_CUTS)
    plan["matching"].update(CUTS)
    plan["max_iterations"] = ITERATIONS
    plan["ipc"] = {ipc: {"preset": f"{name}_ipc{ipc}"} for ipc in ipcs}
    return plan


def run_dataset(name: str, out: Path, *, ipcs: list[int], device: str | None = None) -> dict:
    """Every stage of the paper protocol on a tiny copy of ``name``; writes ``out/results.json`` and ``.md``."""
    from mttlss.baselines import random_real_artifact
    from mttlss.data import load_recorded

    t_start = time.time()
    plan = smoke_plan(name, write_tiny(name, out / "data"), ipcs)
    experts = bench.build_experts(plan, out, device, progress=False)
    expert_seconds = time.time() - t_start
    data, folder = load_recorded(experts.dataset), str(experts.folder)
    sets, tested = {}, {}
    for ipc in ipcs:
        sets[ipc, "random real"] = str(random_real_artifact(dataset=data.name, ipc=ipc, experts=experts.folder, data=data,
                                                            out=out / f"ipc{ipc}" / "random" / "synthetic.safetensors"))
        tested[ipc, "random real"] = {**bench.evaluate_job(sets[ipc, "random real"], plan, folder, device), "distill_seconds": 0.0}
        for method, sub, param, extra in METHODS:
            cap = {"max_images_per_class": LOWRANK_IMAGES} if param == "lowrank" else {}
            cfg = bench.distill_config(plan, ipc, param, device=device, **cap, **extra)
            done = bench.distill_job(cfg, folder, str(out / f"ipc{ipc}" / sub))
            sets[ipc, method] = done["artifact"]
            tested[ipc, method] = {**bench.evaluate_job(done["artifact"], plan, folder, device),
                                   "distill_seconds": done["distill_seconds"]}
    order = [(ipc, m) for ipc in ipcs for m in ["random real"] + [m[0] for m in METHODS]]
    report = {"benchmark": name, "scale": "paper-smoke", "plan": plan, "override": {}, "machine": bench.machine(),
              "workers": 1, "date": time.strftime("%Y-%m-%d"), "expert_seconds": round(expert_seconds, 1),
              "experts": experts.validity(), "total_seconds": round(time.time() - t_start, 1),
              "results": bench.result_rows(order, tested, sets)}
    report["table"] = bench.write_results(out, report)
    return report


def run(out: Path, *, datasets: list[str], ipcs: list[int], device: str | None = None) -> dict[str, dict]:
    """``run_dataset`` for each of ``datasets``, each in its own folder under ``out``."""
    return {name: run_dataset(name, out / name, ipcs=ipcs, device=device) for name in datasets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1], choices=[1, 10, 50])
    ap.add_argument("--out", default=None, help="folder for the run (default: a temporary one, removed after)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="paper_smoke_") as tmp:
        for name, report in run(Path(args.out or tmp), datasets=args.datasets, ipcs=args.ipcs, device=args.device).items():
            print(report["table"])
            bench.stage(f"{name}: {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
