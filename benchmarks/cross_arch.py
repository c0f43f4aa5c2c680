"""Cross-architecture: do the CIFAR-10 CPU benchmark's sets, distilled with ConvNet-3 experts, train other networks?

    python benchmarks/cross_arch.py --record              # --scale cpu (below): ~3.2 h of one core, estimated
    python benchmarks/cross_arch.py --workers 2 --record  # the same cells in two one-thread processes
    python benchmarks/cross_arch.py --scale full --record # every cell at the benchmark's 3 runs: ~24 h of one core
    python benchmarks/cross_arch.py --root /work/snap     # the sets of another checkout's benchmarks/out
    python benchmarks/cross_arch.py --ipcs 10 --methods pixel lowrank --models convnet vgg11   # some cells only

Each set (``<root>/benchmarks/out/cifar10/cpu/ipc<IPC>/<METHOD>/synthetic.safetensors``, written by
``python benchmarks/cifar10.py``) trains every network of ``--models`` with the CIFAR-10 benchmark's own test
recipe (``cifar10.eval_recipe`` of the cpu plan: 300 budget epochs, one step each at IPC 1 and 10, of batch 128
or of all the set's images where it has fewer; SGD at the set's learned lr, x0.1 at half, DSA) and each network is
tested once on the test split, after its last epoch; a cell is mean +- std over networks seeded 0, 1, ... (the
benchmark's seeds). ``convnet`` is the set's own network (ConvNet-3 width 32, the experts'), so its column should
repeat the benchmark's numbers (a check on the run); the other networks
take their registry options (``resnet18_bn``: ResNet-18 with BatchNorm; ``vgg11``: VGG-11 with instance norm;
``alexnet``), never the set's width. The lr is the one learned for ConvNet-3, as in MTT's cross-architecture
table; a network that diverges at it is reported as such, not retuned.

Cost. One thread of this machine's AMD EPYC (2026-12-01, CPU seconds on a core shared with another run, so an
upper bound; the benchmark's own ConvNet cells took 0.8-1.0x of what ``RATES`` predicts for them), per 1,000
training images (DSA included) at batch 128 / batch 10, and per 10,000 test images:

    convnet (width 32)   1.3 / 1.1 s    9 s        ResNet-18 (BN)   73 / 68 s   266 s
    VGG-11               17.6 / 23.5 s  73 s       AlexNet          24.7 / 23.4 s   104 s

A set of more than 128 decoded images trains on 38,400 images per network (300 x 128), so one ResNet-18 network
on one MTT-LSS set takes about 51 minutes. The benchmark's full table (IPC 1 and 10, 4 sets, 4 networks,
3 runs: ``--scale full``) is about 24 hours of one core. ``--scale cpu`` (the default) cuts, and says so in
its output: IPC 1 only (``--ipcs 1 10`` adds IPC 10), and one network instead of 3 for every network but
convnet (``--runs N`` sets every network's runs). Nothing of the recipe is cut. Even so it is about 3.2 hours
of one core (ResNet-18 2 h, AlexNet 41 min, VGG-11 30 min, convnet 7 min; with ``--workers 2`` on two free cores
about 1.7 h; ``--ipcs 1 10`` 8.3 h). The script prints its estimate first and its cut in the table header.

Cells run one at a time in this process (``--workers N``: in N one-thread processes, as in benchmarks/cifar10.py).
Each finished cell is written to ``<out>/cells/`` at once and a rerun reuses it (same set file, network, runs and
recipe), so an interrupted run resumes; nothing is written beside the sets. Results: ``<out>/results.{json,md}``;
``--record`` also writes ``benchmarks/results/cross_arch_<scale>_<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import as_completed
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's mttlss, not another one installed

import cifar10 as bench  # noqa: E402  (benchmarks/, the folder of this script)
from label_storage import cpu_model  # noqa: E402

from mttlss.artifact import read_manifest  # noqa: E402
from mttlss.data import load_recorded  # noqa: E402
from mttlss.evaluate import evaluate_artifact  # noqa: E402
from mttlss.io_utils import atomic_write_json, atomic_write_text  # noqa: E402
from mttlss.models import build_model, model_spec  # noqa: E402
from mttlss.training import DivergedError, budget_steps_per_epoch  # noqa: E402

OWN = bench.SCALES["cpu"]["model"]["name"]  # the sets' own network: it keeps the benchmark's runs at every scale
FULL_IPCS = [1, 10]  # the CIFAR-10 CPU benchmark's
SCALES = {  # other_runs: networks per cell for every network but OWN (None: the benchmark's runs)
    "cpu": {"ipcs": [1], "other_runs": 1},
    "full": {"ipcs": FULL_IPCS, "other_runs": None},
}
MODELS = ["convnet", "resnet18_bn", "vgg11", "alexnet"]
METHODS = ["random", "lowrank_init_soft", "pixel", "lowrank"]
NAMES = {"random": "random real", **{folder: name for name, folder, _, _ in bench.METHODS}}
# CPU seconds of one thread (module docstring): per 1,000 training images at batch 128 and at batch 10, per
# 10,000 test images; 32x32x3 images, DSA on the training batches. Only the estimate reads them.
RATES = {"convnet": (1.3, 1.1, 9.1), "resnet18_bn": (73.0, 67.7, 266.0), "vgg11": (17.6, 23.5, 73.3),
         "alexnet": (24.7, 23.4, 104.4)}


def cuts(*, ipcs: list[int], runs: dict, base_runs: int, epochs: int | None, base_epochs: int) -> str | None:
    """What this run leaves out of the CIFAR-10 benchmark's table and recipe, in words (None: nothing)."""
    said = []
    if sorted(ipcs) != FULL_IPCS:
        said.append(f"IPC {', '.join(map(str, ipcs))} only (the benchmark has {' and '.join(map(str, FULL_IPCS))})")
    for n in sorted({r for r in runs.values() if r < base_runs}, reverse=True):
        names = ", ".join(name for name, r in runs.items() if r == n)
        said.append(f"{n} network{'s' if n > 1 else ''} per cell instead of {base_runs} for {names}")
    if epochs is not None and epochs != base_epochs:
        said.append(f"{epochs} epochs instead of {base_epochs} (a smoke check)")
    return "; ".join(said) or None


def spec_for(name: str, manifest: dict) -> dict:
    """The set's own network spec for its own network's name (ConvNet-3 width 32), else the registry's defaults:
    the set's width and depth are ConvNet options, no other network's."""
    own = manifest.get("model") or {}
    return dict(own) if own.get("name") == name else model_spec(name)


def train_images(recipe, *, n: int, ipc: int, num_classes: int) -> int:
    """Training images one network sees: budget epochs are fixed steps of min(batch, n) images."""
    if recipe.epoch_mode == "budget":
        steps = budget_steps_per_epoch(ipc=ipc, num_classes=num_classes, batch_size=recipe.batch_size)
        return recipe.epochs * steps * min(recipe.batch_size, n)
    return recipe.epochs * n


def estimate_seconds(cell: dict, *, n_test: int, num_classes: int) -> float | None:
    """Seconds of one thread for ``cell`` from ``RATES``; None for a network without a measured rate."""
    if cell["model"] not in RATES:
        return None
    recipe = cell["recipe"]
    at_128, at_10, test = RATES[cell["model"]]
    per_train = at_10 if min(recipe.batch_size, cell["n"]) <= 32 else at_128
    images = train_images(recipe, n=cell["n"], ipc=cell["ipc"], num_classes=num_classes)
    return cell["runs"] * (images / 1000 * per_train + n_test / 10000 * test)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


_DATA: dict = {}  # per process: the test data of each dataset record, loaded once


def recorded_data(data_path: str, record: dict, *, source: str):
    """The set's dataset record (its validation split, shape and classes, checked) read from ``data_path``, the
    file this checkout names, never the path the manifest holds."""
    key = (data_path, json.dumps(record.get("split"), sort_keys=True))
    if key not in _DATA:
        _DATA[key] = load_recorded(dict(record, name=f"npz:{data_path}"), source=source)
    return _DATA[key]


def evaluate_cell(cell: dict, data_path: str, device: str | None, cells_dir: str) -> dict:
    """Train and test ``cell['runs']`` networks of one network on one set; the result is written to
    ``cells_dir`` at once (the resume point) and printed."""
    path = Path(cell["artifact"])
    data = recorded_data(data_path, read_manifest(path)["dataset"], source=str(path))
    t0 = time.time()
    try:
        res = evaluate_artifact(path, data=data, model=cell["spec"], runs=cell["runs"], recipe=cell["recipe"],
                                device=device)
        out = {"accs": res["accs"], "mean": res["mean"], "std": res["std"], "seeds": [r["seed"] for r in res["runs"]],
               "model_spec": res["model"], "lr": res["recipe"]["lr"], "n_train": res["n_train"]}
    except DivergedError as exc:  # the set's lr was learned for ConvNet-3: another network may diverge at it
        out = {"diverged": str(exc)}
    out["seconds"] = round(time.time() - t0, 1)
    done = {**public(cell), **out}
    atomic_write_json(Path(cells_dir) / f"{cell['key']}.json", done)
    what = "diverged" if "diverged" in out else f"{100 * out['mean']:.2f} +- {100 * out['std']:.2f} {out['accs']}"
    bench.stage(f"IPC {cell['ipc']} {NAMES.get(cell['method'], cell['method'])} x {cell['model']}: {what} "
                f"({out['seconds']:.0f}s)")
    return done


def public(cell: dict) -> dict:
    """The JSON-able part of a cell: what decides its result (``settings``) and where it came from."""
    keep = ("key", "ipc", "method", "set", "model", "runs", "artifact", "images_per_class", "n", "estimate_seconds")
    return {**{k: cell[k] for k in keep if k in cell}, "settings": settings(cell)}


def settings(cell: dict) -> dict:
    return {"sha256": cell["sha256"], "spec": cell["spec"], "runs": cell["runs"], "recipe": asdict(cell["recipe"]),
            "data": cell["data"]}


def plan_cells(args, *, recipe, runs_for) -> list[dict]:
    """One cell per set found x network, in table order: set by set, every network in turn."""
    cells = []
    for ipc in args.ipcs:
        for method in args.methods:
            path = Path(args.root) / "benchmarks" / "out" / "cifar10" / "cpu" / f"ipc{ipc}" / method / "synthetic.safetensors"
            if not path.exists():
                raise SystemExit(f"{path} is missing: run python benchmarks/cifar10.py --ipcs {ipc} first, give "
                                 "--root the checkout whose benchmarks/out holds the sets, or drop it from --ipcs/--methods")
            m = read_manifest(path)
            sha = file_digest(path)
            for name in args.models:
                cells.append({"key": f"ipc{ipc}_{method}_{name}", "ipc": ipc, "method": method, "set": NAMES.get(method, method),
                              "model": name, "spec": spec_for(name, m), "runs": runs_for(name), "artifact": str(path),
                              "sha256": sha, "images_per_class": m["storage"]["images_per_class"],
                              "n": m["storage"]["num_images"], "recipe": recipe, "data": str(args.data)})
    return cells


def kept(cell: dict, cells_dir: Path) -> dict | None:
    """An earlier run's result of the same cell (same set file, network, runs, recipe, data), or None."""
    try:
        done = json.loads((cells_dir / f"{cell['key']}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done if done.get("settings") == json.loads(json.dumps(settings(cell))) else None


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="cpu: the cut above (default); full: every cell")
    ap.add_argument("--root", default=str(ROOT), help="the checkout whose benchmarks/out/cifar10/cpu holds the sets")
    ap.add_argument("--data", default=str(bench.DATA), help="the CIFAR-10 .npz the sets were distilled from")
    ap.add_argument("--ipcs", type=int, nargs="+", default=None, help="default: the scale's (cpu: 1; full: 1 10)")
    ap.add_argument("--methods", nargs="+", default=METHODS, help="set folders, as benchmarks/cifar10.py names them")
    ap.add_argument("--models", nargs="+", default=MODELS, help="registry networks (mttlss.models.MODELS)")
    ap.add_argument("--runs", type=int, default=None, help="networks per cell for every network (default: the scale's)")
    ap.add_argument("--epochs", type=int, default=None, help="fewer recipe epochs: a smoke check, not the benchmark")
    ap.add_argument("--workers", type=int, default=1, help="one-thread processes side by side (default: this one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="default: benchmarks/out/cross_arch/<scale>")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/cross_arch_<scale>_<date>.{md,json}")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    scale = SCALES[args.scale]
    args.ipcs = args.ipcs or scale["ipcs"]
    for name in args.models:
        model_spec(name)  # an unknown network stops here, before any work
    plan = bench.plan_for("cpu", expert_epochs=None, smoke=False)
    recipe = bench.eval_recipe(plan)
    if args.epochs is not None:  # a changed recipe gets a name that says so (as evaluate_artifact names it)
        recipe = replace(recipe, epochs=args.epochs, name=f"{recipe.name}@{args.epochs}ep")
    base = plan["eval"]["runs"]

    def runs_for(name: str) -> int:
        return args.runs or (base if name == OWN or scale["other_runs"] is None else scale["other_runs"])

    tag = args.scale + (f"_{args.epochs}ep" if args.epochs is not None else "")
    out = Path(args.out or ROOT / "benchmarks" / "out" / "cross_arch" / tag)
    cells_dir = out / "cells"
    cells = plan_cells(args, recipe=recipe, runs_for=runs_for)
    data = recorded_data(args.data, read_manifest(cells[0]["artifact"])["dataset"], source=cells[0]["artifact"])
    check_cells(cells, data)
    done = {c["key"]: k for c in cells if (k := kept(c, cells_dir)) is not None}
    for cell in cells:
        cell["estimate_seconds"] = estimate_seconds(cell, n_test=len(data.y_test), num_classes=data.num_classes)
    runs = {name: runs_for(name) for name in args.models}
    cut = cuts(ipcs=args.ipcs, runs=runs, base_runs=base, epochs=args.epochs, base_epochs=plan["eval"]["epochs"])
    bench.stage(f"{len(cells)} cells, recipe {recipe.name} ({recipe.epochs} {recipe.epoch_mode} epochs, batch "
                f"{recipe.batch_size}), runs {runs}" + (f"; cut: {cut}" if cut else ""))
    todo = [c for c in cells if c["key"] not in done]
    if done:
        bench.stage(f"kept from an earlier run: {len(done)} of {len(cells)} cells ({cells_dir})")
    hours = sum(c["estimate_seconds"] or 0.0 for c in todo) / 3600
    bench.stage(f"estimated {hours:.1f} h of one thread for the {len(todo)} cells to run (RATES in this script)")
    t_start = time.time()
    done.update(run_cells(todo, args=args, cells_dir=cells_dir))
    results = [done[c["key"]] for c in cells]
    report = {"benchmark": "cross_arch", "scale": args.scale, "cut": cut, "date": time.strftime("%Y-%m-%d"),
              "machine": {**bench.machine(), "cpu": cpu_model()}, "workers": args.workers, "root": str(args.root),
              "recipe": asdict(recipe), "runs": runs, "models": args.models, "ipcs": args.ipcs,
              "methods": args.methods, "total_seconds": round(time.time() - t_start, 1), "cells": results}
    table = markdown(report)
    atomic_write_json(out / "results.json", report)
    atomic_write_text(out / "results.md", table)
    print(table)
    if args.record:
        bench.write_record(f"cross_arch_{tag}_{report['date']}", report, table)
    return 0


def check_cells(cells: list[dict], data) -> None:
    """Stop before any work where a set was made from other data than ``--data`` or a network cannot take its
    images (each network is built once for them)."""
    for path in {c["artifact"] for c in cells}:
        name = read_manifest(path)["dataset"].get("name")
        if name != data.name:
            raise SystemExit(f"{path} was distilled on {name}, but --data reads {data.name}; give --data that file")
    for spec in {json.dumps(c["spec"], sort_keys=True): c["spec"] for c in cells}.values():
        try:
            build_model(spec, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size)
        except ValueError as exc:
            raise SystemExit(f"--models {spec['name']}: {exc}") from exc


def run_cells(todo: list[dict], *, args, cells_dir: Path) -> dict:
    """Evaluate ``todo`` (in order here; longest first in a pool of workers); their results by key."""
    if args.workers > 1:
        todo = sorted(todo, key=lambda c: -(c["estimate_seconds"] or 0.0))
    runner = bench.Runner(args.workers)
    futures = [runner.submit(evaluate_cell, c, args.data, args.device, str(cells_dir)) for c in todo]
    results = {(res := fut.result())["key"]: res for fut in as_completed(futures)}
    runner.close()
    return results


def cell_text(r: dict) -> str:
    if "diverged" in r:
        return f"diverged ({r['seconds']:.0f} s)"
    acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}" if len(r["accs"]) > 1 else f"{100 * r['mean']:.2f}"
    return f"{acc} ({r['seconds']:.0f} s)"


def markdown(report: dict) -> str:
    """One row per set (IPC, set, images/class), one column per network: test accuracy % and seconds per cell."""
    r, m = report["recipe"], report["machine"]
    models, cells = report["models"], {(c["ipc"], c["method"], c["model"]): c for c in report["cells"]}
    heads = []
    for name in models:
        spec = next(c["settings"]["spec"] for c in report["cells"] if c["model"] == name)
        options = "".join(f"{k} {v}, " for k, v in spec.items() if k != "name")
        runs = report["runs"][name]
        heads.append(f"{name} ({options}{runs} run{'s' if runs > 1 else ''})")
    lines = [f"Cross-architecture, {report['scale']} scale, {report['date']}, {m['cpu']} ({m['cpu_count']} cores, "
             f"torch {m['torch']}, {m['torch_threads']} thread(s), {report['workers']} worker process(es)); "
             f"this run {report['total_seconds'] / 60:.1f} min (cells kept from an earlier run count their own seconds)",
             f"sets: {report['root']}/benchmarks/out/cifar10/cpu (benchmarks/cifar10.py's); recipe {r['name']}: "
             f"{r['epochs']} {r['epoch_mode']} epochs, batch {r['batch_size']}, the set's learned lr x{r['lr_decay']} at "
             f"{r['lr_decay_at']:g}, DSA; test split once, after the last epoch; mean ± std over seeded networks, "
             "seconds per cell in brackets",
             *([f"cut from the benchmark: {report['cut']}"] if report["cut"] else []),
             "", "| IPC | set | images/class | " + " | ".join(heads) + " |", "|---" * (3 + len(models)) + "|"]
    rows = dict.fromkeys((c["ipc"], c["method"]) for c in report["cells"])
    for ipc, method in rows:
        first = cells[ipc, method, models[0]]
        texts = [cell_text(cells[ipc, method, name]) for name in models]
        lines.append(f"| {ipc} | {first['set']} | {first['images_per_class']} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
