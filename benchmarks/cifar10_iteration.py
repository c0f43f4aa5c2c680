"""Seconds per outer iteration of one CIFAR-10 CPU-benchmark distillation, at a chosen thread count.

    python benchmarks/cifar10_iteration.py --ipc 1 --threads 2
    taskset -c 0 python benchmarks/cifar10_iteration.py --ipc 1 --threads 1

It runs ``--iterations`` iterations of the benchmark's own settings for that IPC (``benchmarks/cifar10.py``,
labels fixed so that no validation network runs before the first iteration) and prints the median of the
per-iteration seconds that the distillation log records, the first (warm-up) iteration left out. It needs the
benchmark's experts (``python benchmarks/cifar10.py`` trains them). This is what chose the benchmark's worker
processes of one thread each; run one invocation at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar10  # noqa: E402  (the benchmark's one place for sizes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--param", default="lowrank", choices=["lowrank", "pixel"])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--out", default=str(cifar10.ROOT / "benchmarks" / "out" / "cifar10"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mttlss.data import load_recorded
    from mttlss.distillation import distill

    plan = cifar10.plan_for("cpu", expert_epochs=None, smoke=False)
    experts = cifar10.build_experts(plan, Path(args.out) / cifar10.scale_folder("cpu", plan), None)
    cfg = cifar10.distill_config(plan, args.ipc, args.param, iterations=args.iterations, eval_every=0,
                                 labels="soft", label_temperature=1.0)
    result = distill(cfg, experts=experts, out=None, data=load_recorded(experts.dataset), progress=False)
    seconds = [h["seconds"] for h in result.history][1:]
    print(json.dumps({"ipc": args.ipc, "param": args.param, "threads": args.threads, "syn_steps": cfg.syn_steps,
                      "batch_syn": cfg.batch_syn, "median_s_per_iteration": round(statistics.median(seconds), 3),
                      "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
