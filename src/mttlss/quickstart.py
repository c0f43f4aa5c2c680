"""`mttlss quickstart`: the whole method, offline, in a few minutes on a laptop CPU.

On scikit-learn's bundled 8x8 digits it trains a few experts, distills an IPC-1 synthetic set with low-rank
space sampling (soft labels, progressive schedule), distills a pixel-space MTT set with the same matching
settings, draws IPC-1 random real images, evaluates all three the same way on the test split, and prints a
table. Everything lands in ``--out``: experts/, runs/<method>/ (artifacts, logs, grids), report.md, report.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from mttlss.artifact import label_summary, load, read_manifest
from mttlss.baselines import random_real_artifact
from mttlss.config import resolve_config
from mttlss.distillation import distill
from mttlss.evaluate import evaluate_artifact
from mttlss.experts import ExpertConfig, train_experts
from mttlss.io_utils import atomic_write_json, atomic_write_text
from mttlss.models import model_spec

# One place for the quickstart's sizes. Digits are 1x8x8, 10 classes, ~1,300 training images, so a small
# ConvNet (width 32, depth 2: 8 -> 4 -> 2 px) trains an expert epoch in a fraction of a second.
QUICK = {
    "model": {"name": "convnet", "width": 32, "depth": 2},
    "num_experts": 5,
    "expert_epochs_stored": 12,        # E >= max_start_epoch - 1 + expert_epochs
    "ipc": 1,                          # storage budget: 1 x 10 x 64 = 640 floats
    # 3 images per class. Chosen on the validation split: 8x8 digits leave little room for low rank (undistilled,
    # rank 2 shared: 15/class at 35% val; rank 2 per class: 8/class, 66%; rank 4 shared: 3/class, 80%, the same as
    # one random real image per class). Low-rank sampling pays off on larger images (CIFAR: 62/class at r=4).
    # batch_syn 30: the whole decoded set (3 per class x 10), as the recorded quickstart ran before batch_syn had a
    # default (IPC x classes = 10); the pixel set's default, 10, is its whole set
    "lowrank": {"rank": 4, "code": "full", "subspaces": "shared", "num_subspaces": 1, "batch_syn": 30},
    "matching": {"syn_steps": 20, "expert_epochs": 2, "min_start_epoch": 0, "current_max_start_epoch": 4,
                 "max_start_epoch": 10, "expansion_end_epoch": 150, "progressive": True, "lr_teacher": 0.01,
                 "lr_lr": 1e-5, "lr_img": 100.0, "lr_y": 2.0, "threshold": 1.0, "iterations": 200,
                 "eval_every": 50, "eval_epochs": 200, "eval_runs": 1, "grid_every": 0, "checkpoint_every": 50},
    "eval": {"runs": 3, "epochs": 300, "recipe": "mtt-1000"},
}
FAST = {"num_experts": 2, "expert_epochs_stored": 6, "iterations": 20, "max_start_epoch": 4, "current_max_start_epoch": 2,
        "expansion_end_epoch": 10, "eval_every": 10, "eval_epochs": 30, "eval_runs": 1, "runs": 2, "epochs": 40}


def _plan(fast: bool) -> dict:
    plan = {k: (dict(v) if isinstance(v, dict) else v) for k, v in QUICK.items()}
    if fast:  # a seconds-long version of the same pipeline, for the end-to-end test
        plan["num_experts"], plan["expert_epochs_stored"] = FAST["num_experts"], FAST["expert_epochs_stored"]
        for k in ("iterations", "max_start_epoch", "current_max_start_epoch", "expansion_end_epoch", "eval_every", "eval_epochs", "eval_runs"):
            plan["matching"][k] = FAST[k]
        plan["eval"].update(runs=FAST["runs"], epochs=FAST["epochs"])
    return plan


def quickstart(*, out: str | Path = "mttlss-quickstart", fast: bool = False, progress: bool = True) -> dict:
    from mttlss.viz import show_artifact  # here for its measured cost: matplotlib adds ~0.4 s to every CLI start

    out = Path(out)
    plan = _plan(fast)
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)

    say(f"[1/4] training {plan['num_experts']} experts on digits -> {out / 'experts'}")
    ecfg = ExpertConfig(dataset="digits", model=model_spec(**plan["model"]), num_experts=plan["num_experts"],
                        epochs=plan["expert_epochs_stored"], batch_size=128)
    experts = train_experts(ecfg, out / "experts", progress=progress)
    expert_acc = [r["final_val_acc"] for r in experts.validity()]

    artifacts = {}
    for method, param in (("MTT-LSS (lowrank)", "lowrank"), ("MTT (pixel)", "pixel")):
        say(f"[{2 if param == 'lowrank' else 3}/4] distilling {method}, IPC {plan['ipc']}")
        extra = plan["lowrank"] if param == "lowrank" else {}
        cfg = resolve_config(ipc=plan["ipc"], param=param, **extra, **plan["matching"])
        result = distill(cfg, experts=experts, out=out / "runs" / param, progress=progress)
        artifacts[method] = result.artifact
    artifacts["random real"] = random_real_artifact(dataset="digits", ipc=plan["ipc"], experts=out / "experts",
                                                    out=out / "runs" / "random" / "synthetic.safetensors")

    say(f"[4/4] evaluating each set with {plan['eval']['runs']} fresh networks on the test split")
    rows = []
    for method, path in artifacts.items():
        res = evaluate_artifact(path, runs=plan["eval"]["runs"], epochs=plan["eval"]["epochs"], recipe=plan["eval"]["recipe"],
                                record=True)
        m = read_manifest(path)
        rows.append({"method": method, "images_per_class": m["storage"]["images_per_class"],
                     "stored_floats": m["storage"]["stored_floats_images"], "label_floats": m["storage"]["label_floats"],
                     "budget_floats": m["storage"]["budget_floats"], "labels": label_summary(m),
                     "label_choice": (m.get("init") or {}).get("labels"),
                     "test_acc_mean": res["mean"], "test_acc_std": res["std"], "accs": res["accs"], "artifact": str(path)})
    pictures = show_artifact(load(artifacts["MTT-LSS (lowrank)"]), out / "lowrank_grid.png")
    table = _table(rows)
    report = {"plan": plan, "expert_val_acc": expert_acc, "results": rows, "seconds": round(time.time() - t0, 1),
              "pictures": [str(p) for p in pictures]}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", "# mttlss quickstart (digits, IPC 1 storage)\n\n" + table + "\n")
    say("\n" + table)
    say(f"\nexperts' validation accuracy: {', '.join(f'{a:.3f}' for a in expert_acc)}")
    say(f"report: {out / 'report.md'}; pictures: {', '.join(str(p) for p in pictures)}; {report['seconds']} s")
    return report


def _table(rows: list[dict]) -> str:
    # soft labels are stored floats too (DATM and TESLA leave them out of the budget): shown beside the images'
    lines = ["| method | images/class | stored floats (images) | label floats | images + labels (% of budget) | labels "
             "| test acc (mean ± std) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r["test_acc_mean"]):
        total = r["stored_floats"] + r["label_floats"]
        lines.append(f"| {r['method']} | {r['images_per_class']} | {r['stored_floats']} | {r['label_floats']} | "
                     f"{total} ({100 * total / r['budget_floats']:.0f} %) | {r['labels']} | "
                     f"{100 * r['test_acc_mean']:.1f} ± {100 * r['test_acc_std']:.1f} |")
    return "\n".join(lines)
