"""DD-Ranking round trip: distill CIFAR-10 at IPC 1 (a pixel and a low-rank set), export each with
`mttlss export --format ddranking`, score it with DD-Ranking's own evaluator, and print its accuracy beside
`mttlss evaluate`'s under the closest matching recipe.

    python scripts/ddranking_roundtrip.py                      # the small CPU setting (about an hour on 2 cores)
    python scripts/ddranking_roundtrip.py --tiny               # a few minutes: checks that the pipeline runs
    python scripts/ddranking_roundtrip.py --record             # also writes benchmarks/results/ddranking_roundtrip_<date>.*

Rerunning the same command resumes: finished experts, distillation runs and mttlss evaluations are kept.

Run it with the Python that has this checkout's dependencies (torch, ...); mttlss is run from this checkout
(src/ on PYTHONPATH). DD-Ranking 0.2.0 (`ddranking` on PyPI) pins numpy<2 and scipy<1.16, so it gets its own
virtual environment, built once under --work (with --system-site-packages: it reuses the installed torch and
torchvision, and shadows numpy, scipy and pandas with versions ddranking accepts).

The data: the npz copy of CIFAR-10 (../shared/data/cifar10.npz by default). Both tools see the same images: the
script writes a class-balanced training subset as an npz for mttlss and the same images in torchvision's
cifar-10-batches-py layout for DD-Ranking, and the same test images to both. Experts use the field's
normalisation constants (--normalization cifar10), which are also what DD-Ranking normalises its test images
with, so the export needs no conversion; labels are hard (DD-Ranking's hard-label evaluator).

The recipes, side by side (what still differs is printed with the results):
- mttlss evaluate --recipe mtt-1000 --epochs E: fresh ConvNet-3 (width 128, instance norm), SGD momentum 0.9,
  wd 5e-4 at the learned lr, x0.1 at half, batch 256, DSA, tested once after the last epoch;
- DD-Ranking LabelRobustScoreHard: the same network, optimiser, lr, StepLR(E/2, 0.1) and batch, its own DSA
  (same magnitudes), tested every 10 epochs, scored by the best of those tests.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DDRANKING = ("ddranking==0.2.0", "numpy<2", "scipy<1.16")


def sh(cmd: list[str], *, env: dict | None = None) -> str:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    done = subprocess.run(list(map(str, cmd)), env=env, check=True, stdout=subprocess.PIPE, text=True)
    print(done.stdout, end="", file=sys.stderr)
    return done.stdout


def build_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        sh([sys.executable, "-m", "venv", "--system-site-packages", venv])
    try:
        sh([python, "-c", "import ddranking, numpy; assert numpy.__version__ < '2'"])
    except subprocess.CalledProcessError:
        sh([python, "-m", "pip", "install", "-q", *DDRANKING])
    return python


def write_data(npz: Path, work: Path, *, per_class: int, test_images: int) -> tuple[Path, Path]:
    """The subset as an npz (for mttlss) and in torchvision's CIFAR-10 layout (for DD-Ranking): same images."""
    sub, tv = work / "cifar10_subset.npz", work / "cifar10_tv"
    if sub.exists() and (tv / "cifar-10-batches-py" / "test_batch").exists():
        return sub, tv
    with np.load(npz) as f:
        x_train, y_train, x_test, y_test = (f[k] for k in ("x_train", "y_train", "x_test", "y_test"))
        names = [str(c) for c in f["class_names"]] if "class_names" in f.files else [str(i) for i in range(10)]
    keep = np.sort(np.concatenate([np.flatnonzero(y_train == c)[:per_class] for c in range(10)]))
    x_train, y_train = x_train[keep], y_train[keep]
    x_test, y_test = x_test[:test_images], y_test[:test_images]
    np.savez(sub, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=np.array(names))
    folder = tv / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(path: Path, x: np.ndarray, y: np.ndarray) -> None:  # rows: 1024 R, 1024 G, 1024 B values
        rows = np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))
        with open(path, "wb") as fh:
            pickle.dump({"data": rows, "labels": [int(v) for v in y]}, fh)

    for i, part in enumerate(np.array_split(np.arange(len(y_train)), 5), start=1):
        batch(folder / f"data_batch_{i}", x_train[part], y_train[part])
    batch(folder / "test_batch", x_test, y_test)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names}, fh)
    return sub, tv


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npz", default=str(ROOT.parent / "shared" / "data" / "cifar10.npz"))
    p.add_argument("--work", default="ddranking_roundtrip")
    p.add_argument("--venv", default=None, help="default: WORK/venv")
    p.add_argument("--tiny", action="store_true", help="minutes-long sizes that only check the pipeline")
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--expert-epochs", type=int, default=6)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--syn-steps", type=int, default=20)
    p.add_argument("--eval-epochs", type=int, default=100)
    p.add_argument("--eval-runs", type=int, default=2)
    p.add_argument("--record", action="store_true", help="write benchmarks/results/ddranking_roundtrip_<date>.{json,md}")
    args = p.parse_args(argv)
    if args.tiny:
        args.train_per_class, args.test_images, args.experts, args.expert_epochs = 30, 500, 1, 2
        args.iterations, args.syn_steps, args.eval_epochs, args.eval_runs = 2, 3, 10, 1
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    python_dd = build_venv(Path(args.venv).resolve() if args.venv else work / "venv")
    sub, tv = write_data(Path(args.npz), work, per_class=args.train_per_class, test_images=args.test_images)

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    mttlss = [sys.executable, "-m", "mttlss"]
    experts = work / "experts"
    sh([*mttlss, "experts", "--dataset", f"npz:{sub}", "--normalization", "cifar10", "--num-experts", args.experts,
        "--epochs", args.expert_epochs, "--out", experts], env=env)
    window = max(1, args.expert_epochs - 2 + 1)  # T+ with M = 2: T+ - 1 + M <= stored epochs
    rows = []
    # --tiny caps the decoded low-rank set so its evaluations take seconds; the real settings keep all 62 per class
    cap = ["--set", "max_images_per_class=8"] if args.tiny else []
    for param in ("pixel", "lowrank"):
        run = work / f"run_{param}"
        sh([*mttlss, "distill", "--experts", experts, "--ipc", "1", "--param", param, "--iterations", args.iterations,
            "--out", run, *(cap if param == "lowrank" else []), "--set", f"syn_steps={args.syn_steps}", "--set", "expert_epochs=2", "--set", "progressive=false",
            "--set", "min_start_epoch=0", "--set", f"max_start_epoch={window}", "--set", f"current_max_start_epoch={window}",
            "--set", "labels=hard", "--set", "select_on=none", "--set", "eval_every=0", "--set", "grid_every=0"], env=env)
        art = run / "synthetic.safetensors"
        export = work / f"export_{param}"
        sh([*mttlss, "export", art, "--format", "ddranking", "--out", export], env=env)
        ours = work / f"mttlss_eval_{param}_{args.eval_epochs}x{args.eval_runs}.json"
        if not ours.exists():  # a rerun keeps finished steps: experts and runs resume, evaluations are kept
            sh([*mttlss, "evaluate", art, "--dataset", f"npz:{sub}", "--recipe", "mtt-1000", "--epochs", args.eval_epochs, "--runs", args.eval_runs,
                "--json", ours], env=env)
        rows.append({"param": param, "export": str(export), "mttlss": json.loads(ours.read_text()),
                     "sidecar": json.loads((export / "export.json").read_text())})
    theirs = work / "ddranking_eval.json"
    sh([python_dd, ROOT / "scripts" / "ddranking_eval.py", "--data", tv, "--epochs", args.eval_epochs, "--runs",
        args.eval_runs, "--out", theirs, *[r["export"] for r in rows]])
    dd = json.loads(theirs.read_text())
    for r in rows:
        r["ddranking"] = dd[r["export"]]
    report(rows, args, seconds=time.time() - t0)
    return 0


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def report(rows: list[dict], args, *, seconds: float) -> None:
    header = (f"DD-Ranking round trip, CIFAR-10 IPC 1 ({args.train_per_class} training images per class, "
              f"{args.test_images} test images; {args.experts} experts x {args.expert_epochs} epochs; "
              f"{args.iterations} iterations of {args.syn_steps} steps; evaluation {args.eval_epochs} epochs x "
              f"{args.eval_runs} runs), {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min")
    lines = [header, "",
             "| set | images | lr | mttlss evaluate (final epoch) % | DD-Ranking (best of tests every 10 epochs) % |",
             "|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = r["mttlss"], r["ddranking"]
        lines.append(f"| {r['param']} | {theirs['images']} | {theirs['lr']:.4g} | "
                     f"{_mean_std([100 * a for a in ours['accs']])} | {_mean_std(theirs['accs'])} |")
    lines += ["", "What still differs: DD-Ranking scores the best of its tests every 10 epochs (selection on the test "
              "split), mttlss the last epoch; the two DSA implementations draw their random parameters differently; "
              "seeds differ (mttlss seeds each network, DD-Ranking here is seeded per run with set_seed(run)); "
              f"DD-Ranking was passed ipc = images per class ({', '.join(str(r['sidecar']['ipc_to_pass']) for r in rows)})."]
    text = "\n".join(lines)
    print(text)
    if args.record:
        out = ROOT / "benchmarks" / "results" / f"ddranking_roundtrip_{time.strftime('%Y-%m-%d')}"
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows, "seconds": seconds},
                                                       indent=2, default=str))
        print(f"recorded {out}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
