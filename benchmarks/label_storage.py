"""What compact soft labels cost in accuracy: an artifact's learned labels stored in float16 and/or as the top-k
classes per image (``label_dtype``, ``label_topk``; docs/method.md section 6), each tested like the CIFAR-10
benchmark's rows, beside the float32 original, with the label storage of each.

    python benchmarks/label_storage.py benchmarks/out/cifar10/cpu/ipc1/lowrank/synthetic.safetensors ...
    # (its 2026-12-01 record used the set of the mean/std-normalised experts, now cpu_normalize-experts/)
    python benchmarks/label_storage.py ART --variants float16 float32:top1 float16:top3

Each variant is written as an artifact of its own (``<out>/<variant>/synthetic.safetensors``: the same images and
lr, the labels stored compactly) and tested on the test split once, with the benchmark's recipe (3 networks x
300 epochs, batch 128; benchmarks/cifar10.py) and the same seeds, so the only difference is the labels. The
images are not re-distilled: this measures the storage alone, not a run that learned with compact labels in view.
Results: a table and benchmarks/results/label_storage_<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RECIPE = {"runs": 3, "epochs": 300, "batch_size": 128, "epoch_mode": "budget"}  # benchmarks/cifar10.py's test recipe
VARIANTS = ["float32", "float16", "float32:top3", "float16:top3", "float16:top1"]


def parse_variant(text: str) -> tuple[str, int | None]:
    dtype, _, top = text.partition(":top")
    return dtype, (int(top) if top else None)


def write_variant(art, *, dtype: str, topk: int | None, dest: Path) -> Path:
    from mttlss.artifact import save_artifact

    m = art.manifest
    return save_artifact(dest, synthetic=art.synthetic, labels=art.labels, lr=art.lr, preprocessor=art.preprocessor,
                         dataset=m["dataset"], ipc=m["ipc"], model=m.get("model"), experts=m.get("experts"),
                         selection=m.get("selection"), config=m.get("config"),
                         extra={"label_storage_of": str(art.path)}, label_dtype=dtype, label_topk=topk)


def test_once(path: Path, data) -> dict:
    from mttlss.evaluate import evaluate_artifact
    from mttlss.training import EvalRecipe

    recipe = EvalRecipe(name=f"bench-{RECIPE['epochs']}", epochs=RECIPE["epochs"], batch_size=RECIPE["batch_size"],
                        epoch_mode=RECIPE["epoch_mode"])
    t0 = time.time()
    res = evaluate_artifact(path, data=data, runs=RECIPE["runs"], recipe=recipe)
    return {"accs": res["accs"], "mean": res["mean"], "std": res["std"], "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", help="artifacts with soft labels (e.g. the CIFAR-10 benchmark's MTT-LSS rows)")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, help="DTYPE or DTYPE:topK (float32 is the original)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "label_storage"))
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="evaluation epochs (fewer: a smoke check)")
    ap.add_argument("--runs", type=int, default=RECIPE["runs"])
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/label_storage_<date>.{md,json}")
    args = ap.parse_args()
    RECIPE.update(epochs=args.epochs, runs=args.runs)

    from mttlss.artifact import load
    from mttlss.data import load_recorded
    from mttlss.experts import ExpertSet
    from mttlss.labels import label_stats

    rows = []
    for i, src in enumerate(map(Path, args.artifacts)):
        art = load(src)
        if art.label_kind != "logits":
            sys.exit(f"{src} has hard labels; give an artifact with soft labels")
        data = load_recorded(ExpertSet(art.manifest["experts"]["path"]).dataset)  # the experts' own split
        for variant in args.variants:
            dtype, topk = parse_variant(variant)
            dest = Path(args.out) / f"{i}_{src.parent.parent.name}_{src.parent.name}" / variant.replace(":", "_")
            path = write_variant(art, dtype=dtype, topk=topk, dest=dest / "synthetic.safetensors")
            stored = load(path)
            storage = stored.manifest["storage"]
            res = test_once(path, data)
            rows.append({"artifact": str(src), "variant": variant, "images": int(stored.synthetic.num_images),
                         "image_floats": storage["stored_floats_images"], "label_floats": storage["label_floats"],
                         "label_bytes": storage.get("label_bytes"),
                         **label_stats(stored.labels, stored.synthetic.labels_hard()), **res})
            r = rows[-1]
            print(f"{src.parent.parent.name}/{src.parent.name} {variant:>13}: {100 * r['mean']:.2f} +- "
                  f"{100 * r['std']:.2f}  label floats {r['label_floats']}  ({r['seconds']:.0f}s)", flush=True)

    lines = [f"Label storage, {time.strftime('%Y-%m-%d')}, {cpu_model()}; test split once, {RECIPE['runs']} networks x "
             f"{RECIPE['epochs']} epochs each (the CIFAR-10 benchmark's recipe), same images and seeds per artifact", "",
             "| artifact | labels stored as | images | image floats | label floats | agreement % | test acc % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = "/".join(Path(r["artifact"]).parts[-3:-1])
        lines.append(f"| {name} | {r['variant']} | {r['images']} | {r['image_floats']:,} | {r['label_floats']:,} | "
                     f"{100 * r['agreement']:.1f} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.record:
        out = ROOT / "benchmarks" / "results" / f"label_storage_{time.strftime('%Y-%m-%d')}"
        out.with_suffix(".md").write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"recipe": RECIPE, "cpu": cpu_model(), "rows": rows}, indent=2) + "\n")
        print(f"recorded {out}.md and .json")
    return 0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
