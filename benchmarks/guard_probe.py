"""Does the update guard's start-up probe turn the stalled default run into the unguarded one?

With experts trained for one epoch (``benchmarks/cifar10.py --expert-epochs 1``; mean/std-normalised, which is
``--expert-preprocess normalize`` since the CPU scale turned to ZCA, folder ``cpu_experts1ep_normalize-experts``) every segment's matching loss
exceeded threshold 1, so the default run skipped all its updates; the run with ``threshold=1e9`` beat its hard-label
start (``benchmarks/results/cifar10_cpu_experts1ep_threshold_2026-12-01.md``). This runs the benchmark's IPC-1
soft-label MTT-LSS row with the default guard (threshold 1, ``threshold_probe`` 3) for a few iterations on the same
experts and compares its log, iteration by iteration, with the logs of those two earlier runs:

    python benchmarks/guard_probe.py --experts OUT/cpu_experts1ep/experts \\
        --unguarded OUT_THR/cpu_experts1ep/ipc1/lowrank_soft/log.jsonl --stalled OUT/cpu_experts1ep/ipc1/lowrank_soft/log.jsonl

Identical losses mean the run from here on is the unguarded run, whose test accuracy is in its record.
Results: a table and, with --record, benchmarks/results/guard_probe_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's mttlss, not another one installed

from label_storage import cpu_model  # noqa: E402  (benchmarks/, the folder of this script)


def _log(path: str | Path, n: int) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", required=True, help="the one-epoch experts folder of benchmarks/cifar10.py")
    ap.add_argument("--unguarded", required=True, help="log.jsonl of the row run with threshold=1e9")
    ap.add_argument("--stalled", required=True, help="log.jsonl of the row run with the guard before the probe existed")
    ap.add_argument("--iterations", type=int, default=4, help="iterations to run and compare")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the earlier runs used one per worker)")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()

    import torch

    import cifar10 as bench
    from mttlss.data import load_recorded
    from mttlss.distillation import distill
    from mttlss.experts import ExpertSet
    from mttlss.io_utils import atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    plan = bench.plan_for("cpu", expert_epochs=1, smoke=False)
    cfg = bench.distill_config(plan, 1, "lowrank", labels="soft", stop_after=args.iterations)
    experts = ExpertSet(args.experts)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="guard_probe_") as out:
        result = distill(cfg, experts=experts, out=out, data=load_recorded(experts.dataset), progress=True)
        now = _log(Path(out) / "log.jsonl", args.iterations)
    unguarded, stalled = _log(args.unguarded, args.iterations), _log(args.stalled, args.iterations)
    rows = [{"iteration": a["iteration"], "default_now": a["loss"], "skipped_now": a["skipped"],
             "unguarded": b["loss"], "stalled_before": c["loss"], "skipped_before": c["skipped"]}
            for a, b, c in zip(now, unguarded, stalled)]
    same = all(r["default_now"] == r["unguarded"] for r in rows) and len(rows) == args.iterations
    lines = ["| iteration | default guard now: loss (skipped) | threshold=1e9 run: loss | default guard before: loss (skipped) |",
             "|---|---|---|---|"]
    lines += [f"| {r['iteration']} | {r['default_now']:.7f} ({r['skipped_now']}) | {r['unguarded']:.7f} | "
              f"{r['stalled_before']:.7f} ({r['skipped_before']}) |" for r in rows]
    guard = result.init_info["guard"]
    summary = (f"{cpu_model()}, torch {torch.__version__}, {args.threads} thread(s), {time.time() - t0:.0f} s. "
               f"Guard: {guard['why']}. Losses identical to the threshold=1e9 run in all {len(rows)} iterations: {same}.")
    print("\n".join(lines) + "\n\n" + summary)
    if args.record:
        stem = ROOT / "benchmarks" / "results" / f"guard_probe_{time.strftime('%Y-%m-%d')}"
        atomic_write_json(stem.with_suffix(".json"), {"benchmark": "guard_probe", "cpu": cpu_model(),
                                                      "threads": args.threads, "torch": torch.__version__,
                                                      "guard": guard, "rows": rows, "identical": same,
                                                      "argv": sys.argv})
        atomic_write_text(stem.with_suffix(".md"), f"Update-guard probe on one-epoch CIFAR-10 experts "
                          f"({time.strftime('%Y-%m-%d')})\n\n" + "\n".join(lines) + "\n\n" + summary
                          + "\n\nCommand: `python " + " ".join(sys.argv) + "`\n")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
