"""Why low rank does not win on 8x8 digits at IPC 1: undistilled low-rank sets against one random real image.

    python benchmarks/digits_lowrank_init.py

Each configuration re-codes real training images into its subspaces by 2-D PCA (no distillation, hard labels)
at the IPC-1 budget of 640 floats, then trains 2 seeded networks (the quickstart's ConvNet, 300 epochs, lr 0.01)
and reports accuracy on the VALIDATION split (this is how the quickstart's rank was chosen). Writes JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [(2, "shared", "full"), (2, "per_class", "full"), (3, "shared", "full"), (4, "shared", "full"),
           (2, "shared", "diag"), (3, "per_class", "diag"), (4, "shared", "diag")]


def main() -> int:
    from mttlss.data import load_dataset
    from mttlss.evaluate import get_recipe
    from mttlss.io_utils import atomic_write_json
    from mttlss.models import model_spec
    from mttlss.parameterization import BudgetError, LowRankSet, PixelSet, solve_budget
    from mttlss.preprocessing import Preprocessor
    from mttlss.training import evaluate_synthetic

    data = load_dataset("digits")
    pre = Preprocessor.fit("normalize", data.x_train, dataset="digits")
    x, y, x_val = pre(data.x_train), data.y_train, pre(data.x_val)
    spec, recipe = model_spec("convnet", width=32, depth=2), get_recipe("mtt-1000", epochs=300)

    def val_acc(images, labels) -> float:
        return evaluate_synthetic(images=images, targets=labels, x_test=x_val, y_test=data.y_val, model_spec=spec,
                                  num_classes=10, lr=0.01, recipe=recipe, runs=2, seed=0)["mean"]

    rows = []
    real = PixelSet.from_real(x, y, num_classes=10, images_per_class=1, generator=torch.Generator().manual_seed(0))
    rows.append({"set": "random real", "images_per_class": 1, "reconstruction_error": 0.0,
                 "val_acc": val_acc(real.decode().detach(), real.labels_hard())})
    for rank, subspaces, code in CONFIGS:
        try:
            budget = solve_budget(num_classes=10, image_shape=(1, 8, 8), ipc=1, rank=rank, code=code, subspaces=subspaces)
        except BudgetError:
            continue
        syn, info = LowRankSet.from_real(x, y, num_classes=10, images_per_class=budget.images_per_class, rank=rank,
                                         code=code, subspaces=subspaces, generator=torch.Generator().manual_seed(0))
        rows.append({"set": f"lowrank r={rank} {subspaces} {code}", "images_per_class": budget.images_per_class,
                     "reconstruction_error": info["relative_reconstruction_error"],
                     "val_acc": val_acc(syn.decode().detach(), syn.labels_hard())})
    print("| set | images/class | relative reconstruction error | val acc % |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['images_per_class']} | {r['reconstruction_error']:.3f} | {100 * r['val_acc']:.1f} |")
    atomic_write_json(ROOT / "benchmarks" / "out" / "digits_lowrank_init.json", {"runs": 2, "epochs": 300, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
