"""What each stage of the paper protocol costs: FLOPs counted, memory measured, GPU time estimated.

    python benchmarks/gpu_estimate.py --record               # every shipped preset, at an assumed 10 TFLOP/s
    python benchmarks/gpu_estimate.py --tflops 25            # the rate your card sustains on these convolutions

Counted, not guessed (device independent, on this machine's CPU in a few seconds): the FLOPs of the paper's
network (ConvNet-3 width 128, 32x32x3) per training image and per test image, and of one inner step of the
unroll per synthetic image, forward plus outer backward, in memory=full and memory=checkpoint
(``torch.utils.flop_counter``, one small batch: both scale linearly with the batch; the counter counts matrix
products and convolutions only, so normalisation, ReLU, pooling and DSA are not in the FLOPs); the bytes of
graph that full mode keeps per inner step, a per-image part plus a per-step part (theta), fitted from
``matching.graph_bytes_per_step`` (the measurement ``mttlss distill``'s memory check makes at the run's own
batch) at two batch sizes of plain images. Each preset then gives its stages' image counts:

    experts    num_experts x epochs x training images (the train split less the validation split); the
               epochs are 50 or what the dataset's longest window needs (max_start_epoch - 1 + expert_epochs)
    distill    iterations x syn_steps x batch_syn image-steps (costed in memory=checkpoint), plus its validation
               networks (eval_epochs epochs over the decoded set, with their tests): the start's label
               candidates, then every eval_every iterations and at the last
    evaluate   runs x epochs over the decoded set (the paper's decoded epochs) plus one test pass each

**The times are estimates**: FLOPs / the ``--tflops`` rate, which is an assumption (no GPU was measured). At
batch_syn 10 (CIFAR-10 and SVHN IPC 1 pixel) a GPU is bound by kernel launches, not FLOPs, so those rows are
under-estimates; the decode, DSA and data loading are not counted. Memory: full mode's graph (x1.2 allocator overhead, as distill
estimates it) and checkpoint mode's two step graphs plus theta_n [N, P]; the resident model, data and CUDA
context come on top. ``benchmarks/speed.py --device cuda --paper`` measures the unroll where a GPU is lent.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's mttlss

import cifar10 as bench  # noqa: E402  (benchmarks/: the paper plan's experts and evaluation)

from mttlss.config import preset_names, resolve_config  # noqa: E402
from mttlss.distillation import default_batch_syn, unroll_bytes  # noqa: E402
from mttlss.experts import ExpertConfig  # noqa: E402
from mttlss.initialization import budget_for  # noqa: E402
from mttlss.labels import CONFIDENCES, TEMPERATURES  # noqa: E402
from mttlss.matching import InnerSteps, batch_schedule, graph_bytes_per_step, trajectory_loss, unroll_student  # noqa: E402
from mttlss.models import ParamLayout, build_model, flatten_params, model_spec  # noqa: E402

# the paper protocol (benchmarks/cifar10.py SCALES["paper"], method.md 11.1): experts and final evaluation
PAPER = bench.SCALES["paper"]
EXPERTS = PAPER["experts"]  # num_experts, epochs (at least: expert_epochs_for)
EVALUATION = PAPER["eval"]  # runs, epochs over the decoded set
MATCHING = PAPER["matching"]  # the distill knobs the paper plan sets besides the preset (validation)
DATASETS = {"cifar10": (10, 50000, 10000), "cifar100": (100, 50000, 10000), "svhn": (10, 73257, 26032)}
SPEC = model_spec("convnet", width=128, depth=3)
_GIB = 2**30


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def counted(num_classes: int, *, batch: int = 8, steps: int = 2) -> dict:
    """FLOPs per image (train step, test forward) and per image-step of the unroll; full mode's graph bytes per
    inner step as a per-image and a per-step part (a line through batches batch / 2 and batch)."""
    torch.manual_seed(0)
    model = build_model(SPEC, channels=3, num_classes=num_classes, image_size=(32, 32))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.arange(batch) % num_classes
    train = flops(lambda: F.cross_entropy(model(x), y).backward()) / batch
    with torch.no_grad():
        test = flops(lambda: model(x)) / batch
    layout, start = ParamLayout.of(model), flatten_params(model)
    target = start + 0.01 * torch.randn(start.shape)
    out = {"train_flop_per_image": train, "test_flop_per_image": test, "params": start.numel()}
    for memory in ("full", "checkpoint"):
        syn = x.clone().requires_grad_(True)
        lr = torch.tensor(0.01, requires_grad=True)

        def iteration():
            theta = unroll_student(model, layout, start, decode=lambda idx: syn[idx],
                                   label_loss=lambda z, idx: F.cross_entropy(z, y[idx]), syn_lr=lr,
                                   batches=batch_schedule(batch, batch, steps, torch.Generator().manual_seed(0)),
                                   dsa_config=None, generator=None, memory=memory, learnables=(syn,))
            trajectory_loss(theta, start, target).backward()

        out[f"unroll_flop_per_image_step_{memory}"] = flops(iteration) / (batch * steps)
    graph = {}
    for b in (batch // 2, batch):
        one_step = InnerSteps(model=model, layout=layout, decode=lambda idx: x[idx], batches=[torch.arange(b)],
                              label_loss=lambda z, idx: F.cross_entropy(z, y[idx]), dsa_config=None, generator=None)
        graph[b] = graph_bytes_per_step(one_step, start)
    out["graph_bytes_per_image_step"] = (graph[batch] - graph[batch // 2]) / (batch - batch // 2)
    out["graph_bytes_per_step"] = graph[batch] - batch * out["graph_bytes_per_image_step"]
    return out


def validations(cfg) -> tuple[int, int]:
    """Validation networks of a run: (at the start, to choose its labels; in the loop), as distillation does."""
    if cfg.select_on != "val":
        return 0, 0
    start = 0
    if cfg.label_mode != "hard":
        fixed = cfg.label_temperature if cfg.label_init == "experts" else cfg.label_confidence
        candidates = 1 if fixed is not None else len(TEMPERATURES if cfg.label_init == "experts" else CONFIDENCES)
        start = (candidates if candidates > 1 or cfg.label_mode == "auto" else 0) + (cfg.label_mode == "auto")
    loop = (cfg.iterations // cfg.eval_every + (cfg.iterations % cfg.eval_every > 0)) if cfg.eval_every else 1
    return start, loop


def dataset_of(preset: str) -> str:
    return preset.split("_ipc")[0]


def expert_epochs_for(dataset: str) -> int:
    """Epochs the dataset's experts need: the paper's 50, or more where a preset's window reaches further."""
    need = [(c := resolve_config(preset=p)).max_start_epoch - 1 + c.expert_epochs for p in preset_names()
            if dataset_of(p) == dataset]
    return max([EXPERTS["epochs"], *need])


def stages(preset: str, c: dict) -> list[dict]:
    """The preset's three stages: image counts, FLOPs and (distill) the unroll's memory per mode."""
    cfg = resolve_config(preset=preset, **MATCHING)
    dataset = dataset_of(preset)
    epochs = expert_epochs_for(dataset)
    classes, n_train, n_test = DATASETS[dataset]
    n_val = min(ExpertConfig.val_max, int(round(ExpertConfig.val_fraction * n_train)))
    budget = budget_for(cfg, SimpleNamespace(num_classes=classes, channels=3, image_size=(32, 32)))
    decoded = budget.images_per_class * classes
    batch = min(cfg.batch_syn or default_batch_syn(cfg, classes)[0], decoded)
    expert_images = EXPERTS["num_experts"] * epochs * (n_train - n_val)
    at_start, in_loop = validations(cfg)
    image_steps = cfg.iterations * cfg.syn_steps * batch
    val_networks = (at_start + in_loop) * cfg.eval_runs
    val_train = val_networks * cfg.eval_epochs * decoded
    step_graph = batch * c["graph_bytes_per_image_step"] + c["graph_bytes_per_step"]
    peak = unroll_bytes(step_graph, syn_steps=cfg.syn_steps, theta_bytes=c["params"] * 4)  # float32 theta
    common = {"preset": preset, "dataset": dataset, "decoded_images": decoded}
    return [
        {**common, "stage": "experts", "what": f"{EXPERTS['num_experts']} x {epochs} epochs x "
         f"{n_train - n_val:,} images", "flop": expert_images * c["train_flop_per_image"]
         + EXPERTS["num_experts"] * epochs * n_val * c["test_flop_per_image"]},
        {**common, "stage": "distill", "what": f"{cfg.iterations:,} it x {cfg.syn_steps} steps x {batch}; "
         f"{at_start} + {in_loop} validations", "flop_full": image_steps * c["unroll_flop_per_image_step_full"],
         "flop": image_steps * c["unroll_flop_per_image_step_checkpoint"] + val_train * c["train_flop_per_image"]
         + val_networks * n_val * c["test_flop_per_image"],
         "gib_full": peak["full"] / _GIB, "gib_checkpoint": peak["checkpoint"] / _GIB},
        {**common, "stage": "evaluate", "what": f"{EVALUATION['runs']} x {EVALUATION['epochs']} epochs x {decoded:,}",
         "flop": EVALUATION["runs"] * (EVALUATION["epochs"] * decoded * c["train_flop_per_image"]
                                       + n_test * c["test_flop_per_image"])},
    ]


def duration(flop: float, tflops: float) -> str:
    h = flop / (tflops * 1e12) / 3600
    return "< 1 min" if h < 1 / 60 else f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def markdown(report: dict) -> str:
    t = report["tflops"]
    c = next(iter(report["counted"].values()))
    lines = [f"Paper-protocol cost per stage, {report['date']}: FLOPs counted with torch's FLOP counter (ConvNet-3 "
             f"width 128; matrix products and convolutions only), memory from the measured graph per inner step ("
             f"{c['graph_bytes_per_image_step'] / 2**20:.2f} MiB per image + {c['graph_bytes_per_step'] / 2**20:.2f} MiB); "
             f"**time = FLOPs / {t:g} TFLOP/s, an assumed rate, not a measurement** (distill costed in memory=checkpoint; "
             f"full mode's unroll FLOPs are {c['unroll_flop_per_image_step_full'] / c['unroll_flop_per_image_step_checkpoint']:.2f}x "
             "checkpoint's where it fits); unroll GiB is the unroll alone: the data, the experts being read and "
             "the CUDA context come on top; decode, DSA and data loading are not counted", "",
             "| preset | stage | what | PFLOP | est. time | unroll GiB, full | unroll GiB, checkpoint |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        mem = [f"{row[k]:.1f}" if k in row else "" for k in ("gib_full", "gib_checkpoint")]
        lines.append(f"| {row['preset']} | {row['stage']} | {row['what']} | {row['flop'] / 1e15:.2f} | "
                     f"{duration(row['flop'], t)} | {mem[0]} | {mem[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, default=10.0, help="the sustained rate assumed for the time column")
    ap.add_argument("--presets", nargs="+", default=None, help="default: every shipped preset")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/gpu_estimate_<date>.{md,json}")
    args = ap.parse_args(argv)
    order = list(DATASETS)  # CIFAR-10, CIFAR-100, SVHN; IPC 1, 10, 50; pixel before lowrank
    presets = sorted(args.presets or preset_names(), key=lambda p: (order.index(dataset_of(p)),
                     int(p.split("_ipc")[1].split("_")[0]), p.rsplit("_", 1)[1] != "pixel"))
    per_classes = {classes: counted(classes) for classes in sorted({DATASETS[dataset_of(p)][0] for p in presets})}
    rows = []
    for preset in presets:
        experts_row, *rest = stages(preset, per_classes[DATASETS[dataset_of(preset)][0]])
        # one expert set serves every preset of a dataset (the longest window's epochs): listed once per dataset
        if not any(r["stage"] == "experts" and r["dataset"] == experts_row["dataset"] for r in rows):
            rows.append({**experts_row, "preset": f"{experts_row['dataset']} experts"})
        rows.extend(rest)
    report = {"benchmark": "gpu_estimate", "date": date.today().isoformat(), "tflops": args.tflops,
              "experts": EXPERTS, "evaluation": EVALUATION, "counted": per_classes, "rows": rows}
    table = markdown(report)
    print(table)
    if args.record:
        bench.write_record(f"gpu_estimate_{report['date']}", report, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
