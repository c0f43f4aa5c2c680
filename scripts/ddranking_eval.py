"""Evaluate exported mttlss artifacts with DD-Ranking's own evaluator. Runs INSIDE the ddranking virtual environment
(scripts/ddranking_roundtrip.py builds it and calls this); it imports ddranking and torch, never mttlss.

    python scripts/ddranking_eval.py --data DIR --epochs 100 --runs 2 --out results.json EXPORT_DIR [EXPORT_DIR ...]

Each EXPORT_DIR is what `mttlss export --format ddranking` wrote (images.pt, labels.pt, lr.pt, export.json). DIR
holds CIFAR-10 in torchvision's layout (cifar-10-batches-py/), which DD-Ranking's get_dataset reads.

What runs is LabelRobustScoreHard's evaluation of a synthetic set (``_compute_hard_label_metrics_helper`` with
mode 'syn'): DD-Ranking's ConvNet-3, its training loop, its DSA, its optimiser and step schedule, its normalised
CIFAR-10 test loader, and its score, the best test accuracy over tests every 10 epochs. The metric's other
parts (full-data training for HLR, the random-subset baseline with a learning-rate grid) are not run: they
score DD-Ranking's own references, not the exported set. (GeneralEvaluator, the plain accuracy evaluator, fails
in ddranking 0.2.0: its __init__ reads an undefined name, use_torchvision, and compute_metrics never fills accs.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torchvision

# DD-Ranking calls torchvision's CIFAR10(download=True), which md5-checks the extracted batches and downloads on a
# mismatch. The batches here are written from the npz copy (same images), so "present" must count as verified.
torchvision.datasets.CIFAR10._check_integrity = lambda self: True
torchvision.datasets.CIFAR10.meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # md5 None: "the file exists"

from ddranking.metrics import LabelRobustScoreHard  # noqa: E402  (after the patch above)
from ddranking.utils import set_seed  # noqa: E402

# MTT's DSA magnitudes, under the keys ddranking.aug.DSA reads
DSA_PARAMS = {"scale": 1.2, "rotate": 15.0, "flip": 0.5, "brightness": 1.0, "saturation": 2.0, "contrast": 0.5,
              "crop": 0.125, "cutout": 0.5}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.epochs < 10:
        raise SystemExit("--epochs must be >= 10: DD-Ranking tests every 10 epochs and scores the best test")

    first = json.loads((Path(args.exports[0]) / "export.json").read_text())
    evaluator = LabelRobustScoreHard(
        dataset="CIFAR10", real_data_path=args.data, ipc=int(first["ipc_to_pass"]), model_name="ConvNet-3",
        data_aug_func="dsa", aug_params=dict(DSA_PARAMS), optimizer="sgd", lr_scheduler="step",
        step_size=max(1, args.epochs // 2), weight_decay=5e-4, momentum=0.9, use_zca=False, num_eval=args.runs,
        num_epochs=args.epochs, real_batch_size=256, syn_batch_size=256, num_workers=0, device="cpu",
        save_path=str(Path(args.out).with_suffix(".csv")),
    )
    results = {}
    for folder in map(Path, args.exports):
        side = json.loads((folder / "export.json").read_text())
        if side.get("space") == "zca":
            raise SystemExit(f"{folder}: ZCA export; this round trip compares mean/std artifacts (with use_zca=True, "
                             "ddranking 0.2.0 whitens its real test loader but not the one synthetic sets are tested on)")
        images = torch.load(folder / "images.pt", weights_only=True)  # [n, 3, 32, 32], DD-Ranking's normalised space
        labels = torch.load(folder / "labels.pt", weights_only=True)
        lr = float(torch.load(folder / "lr.pt", weights_only=True))
        hard = labels if not labels.is_floating_point() else labels.argmax(1)  # the hard-label metric
        evaluator.ipc = int(side["ipc_to_pass"])
        accs = []
        for run in range(args.runs):
            set_seed(run)  # DD-Ranking seeds from the clock when given none
            acc, _ = evaluator._compute_hard_label_metrics_helper(image_tensor=images, image_path=None, hard_labels=hard,
                                                                  lr=lr, mode="syn")
            accs.append(float(acc))
            print(f"{folder.name} run {run}: {acc:.2f} %", file=sys.stderr)
        results[str(folder)] = {"accs": accs, "lr": lr, "images": int(len(images)), "ipc_passed": evaluator.ipc,
                                "labels": "hard" if not labels.is_floating_point() else "argmax of logits"}
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
