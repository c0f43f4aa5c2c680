"""Tune the CIFAR-10 CPU-scale benchmark on the validation split: run variants of one distillation, print
each one's validation-accuracy curve.

    python benchmarks/cifar10_tune.py --ipc 1 --iterations 150 \\
        --variant base '{}' --variant fixed_alpha '{"lr_lr": 0.0}'

Each variant is a JSON object of DistillConfig overrides applied on top of ``benchmarks/cifar10.py``'s CPU
settings for that IPC (so ``'{}'`` is exactly what the benchmark runs). Validation uses the benchmark's
300-budget-epoch recipe on the held-out split the experts never saw; the test split is never touched.
It needs the benchmark's experts (run ``python benchmarks/cifar10.py`` once, or let this script train them).
Variants run one after another (never two at once: they would slow each other down). Results: a table on
stdout, and ``<out>/<folder>/tune_ipc<k>_<param>.json`` (``cpu``, or the folder of ``--expert-preprocess`` /
``--expert-optimizer``: ``cifar10.scale_folder``), which keeps the rows of earlier invocations (a variant run
again under the same name replaces its row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar10  # noqa: E402  (the benchmark's one place for sizes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--param", default="lowrank", choices=["lowrank", "pixel"])
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50, help="iterations between validation evaluations")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    ap.add_argument("--out", default=str(cifar10.ROOT / "benchmarks" / "out" / "cifar10"))
    cifar10.add_expert_arguments(ap)
    args = ap.parse_args()

    from mttlss.data import load_recorded
    from mttlss.distillation import distill

    plan = cifar10.plan_for("cpu", expert_epochs=None, smoke=False, expert_optimizer=args.expert_optimizer,
                            preprocess=args.expert_preprocess)
    out = Path(args.out) / cifar10.scale_folder("cpu", plan)
    experts = cifar10.build_experts(plan, out, None)
    data = load_recorded(experts.dataset)  # the experts' own train/validation split
    for name, overrides in args.variant:
        extra = {"iterations": args.iterations, "eval_every": args.eval_every, **json.loads(overrides)}
        cfg = cifar10.distill_config(plan, args.ipc, args.param, **extra)
        t0 = time.time()
        # out=None: nothing to resume or keep; the curve is the result
        result = distill(cfg, experts=experts, out=None, data=data, progress=False)
        curve = [[0, result.init_info.get("init_val_acc")]] + [[h["iteration"] + 1, h["val_acc"]] for h in result.history if "val_acc" in h]
        losses = [h["loss"] for h in result.history]
        row = {"variant": name, "date": time.strftime("%Y-%m-%d"), "overrides": extra, "val_curve": curve,
               "final_alpha": result.history[-1]["syn_lr"],
               "skipped_updates": sum(h["skipped"] for h in result.history),
               "loss_first_20": sum(losses[:20]) / max(1, len(losses[:20])),
               "loss_last_20": sum(losses[-20:]) / max(1, len(losses[-20:])), "seconds": round(time.time() - t0, 1)}
        print(f"{name:>20}  " + "  ".join(f"{it}:{100 * acc:.2f}" for it, acc in curve if acc is not None)
              + f"  alpha {row['final_alpha']:.4f}  skips {row['skipped_updates']}  {row['seconds']:.0f}s", flush=True)
        _record(out / f"tune_ipc{args.ipc}_{args.param}.json", args, row)  # after each variant: a kill loses one at most
    return 0


def _record(path: Path, args, row: dict) -> None:
    """Add ``row`` to the file, keeping earlier invocations' rows; a variant run again replaces its own row."""
    from mttlss.io_utils import atomic_write_json

    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    atomic_write_json(path, {"ipc": args.ipc, "param": args.param, "machine": cifar10.machine(),
                             "rows": [r for r in earlier if r["variant"] != row["variant"]] + [row]})


if __name__ == "__main__":
    sys.exit(main())
