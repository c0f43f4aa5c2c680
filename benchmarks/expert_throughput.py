"""Expert-training throughput (images/s) on CIFAR-10 with ConvNet-3, plain fp32 against the fast options,
and whether the fast path changes expert accuracy.

    python benchmarks/expert_throughput.py                 # width 128 (the field's ConvNet-3)
    python benchmarks/expert_throughput.py --width 32      # the CPU-scale benchmark network
    python benchmarks/expert_throughput.py --accuracy-epochs 2 --subset 10000

Throughput: the median over ``--repeats`` timed windows of ``--steps`` training steps (batch 256, DSA on,
as in expert training), after warm-up steps (torch.compile compiles during warm-up). All variants run side by
side in one process, so their ratio is meaningful even on a noisy machine. Writes JSON next to the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10.npz"

VARIANTS = {
    "fp32 eager": dict(channels_last=False, bf16=False, compile=False),
    "channels_last": dict(channels_last=True, bf16=False, compile=False),
    "compile": dict(channels_last=False, bf16=False, compile=True),
    "bf16 autocast": dict(channels_last=False, bf16=True, compile=False),
    "bf16 + compile": dict(channels_last=False, bf16=True, compile=True),
    "channels_last + bf16 + compile": dict(channels_last=True, bf16=True, compile=True),
}


def throughput(x, y, spec, variant, *, steps, repeats, warmup, batch_size=256) -> list[float]:
    from mttlss.augment import DSAConfig, dsa
    from mttlss.models import build_model

    torch.manual_seed(0)
    model = build_model(spec, channels=3, num_classes=10, image_size=(32, 32))
    if variant["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if variant["compile"] else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    cfg = DSAConfig()

    def step():
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb = dsa(x[idx], config=cfg, generator=gen)
        if variant["channels_last"]:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant["bf16"]):
            loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return rates


def accuracy_check(data, pre, spec, variant, *, epochs, subset) -> float:
    """Validation accuracy of one expert trained ``epochs`` epochs on ``subset`` training images."""
    from mttlss.experts import ExpertConfig, train_expert

    cfg = ExpertConfig(dataset=data.name, model=spec, epochs=epochs, **variant)
    small = type(data)(**{**data.__dict__, "x_train": data.x_train[:subset], "y_train": data.y_train[:subset]})
    return float(train_expert(0, cfg, data=small, pre=pre, device="cpu")["val_acc"][-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--accuracy-epochs", type=int, default=0, help="also train one expert per variant this many epochs")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "expert_throughput.json"))
    args = ap.parse_args()

    from mttlss.data import load_dataset
    from mttlss.io_utils import atomic_write_json
    from mttlss.models import model_spec
    from mttlss.preprocessing import Preprocessor

    data = load_dataset(f"npz:{DATA}")
    pre = Preprocessor.fit("normalize", data.x_train, dataset="cifar10")
    x, y = pre(data.x_train[:10000]), data.y_train[:10000]
    spec = model_spec("convnet", width=args.width)
    results = []
    for name in args.variants:
        rates = throughput(x, y, spec, VARIANTS[name], steps=args.steps, repeats=args.repeats, warmup=args.warmup)
        row = {"variant": name, "median_images_per_s": statistics.median(rates), "rates": rates}
        if args.accuracy_epochs:
            row["val_acc"] = accuracy_check(data, pre, spec, VARIANTS[name], epochs=args.accuracy_epochs, subset=args.subset)
        results.append(row)
        print(f"{name:32s} {row['median_images_per_s']:8.0f} img/s" + (f"  val acc {row['val_acc']:.4f}" if "val_acc" in row else ""),
              flush=True)
    base = results[0]["median_images_per_s"]
    print("\n| variant | images/s (median) | ratio to first | val acc |\n|---|---|---|---|")
    for r in results:
        acc = f"{r['val_acc']:.4f}" if "val_acc" in r else "-"
        print(f"| {r['variant']} | {r['median_images_per_s']:.0f} | {r['median_images_per_s'] / base:.2f} | {acc} |")
    atomic_write_json(args.out, {"width": args.width, "threads": torch.get_num_threads(), "torch": torch.__version__,
                                 "accuracy_epochs": args.accuracy_epochs, "subset": args.subset, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
