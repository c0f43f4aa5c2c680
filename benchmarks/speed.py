"""Speed and memory of one outer iteration of trajectory matching, per memory mode, precision and allocator.

    python benchmarks/speed.py                  # the issue's cells on this machine (about 30 min on 2 CPU cores)
    python benchmarks/speed.py --quick          # a smoke run: small cells, one repetition
    python benchmarks/speed.py --device cuda --paper   # paper sizes on a GPU (CIFAR-10/100 IPC 10, syn_steps 80)
    python benchmarks/speed.py --tesla          # only memory=tesla against full and checkpoint, pixel cells (~15 min)
    python benchmarks/speed.py --allocators     # only the allocators (tcmalloc, jemalloc where installed), pixel cells
    python benchmarks/speed.py --precisions     # only fp32 against bf16, every speed cell, with the command's allocator
    python benchmarks/speed.py --forms          # bf16 as autocast or as BF16Products x avg_pool2d or AvgPool2x2 (~45 min at --rounds 3 --iters 2)
    python benchmarks/speed.py --threshold      # fp32 against bf16 where precision=auto draws its line (~10 min)
    python benchmarks/speed.py --tesla --fidelity-only   # only the fidelity rows (here tesla's), no timing

One outer iteration = decode, DSA and the unroll of ``syn_steps`` student steps (ConvNet-3 width 128 on CIFAR
shapes, batch_syn = IPC x classes), the normalised trajectory loss, its backward into every learnable and one SGD
step: exactly what ``mttlss distill`` does per iteration, minus the validation networks.

Each variant runs in its own child process (``--worker``): peak RSS belongs to a process (``os.wait4``), and the
allocator setting is per process. The children run one at a time, variants alternated round by round, so
machine drift hits all alike; seconds per iteration are medians over rounds, after one untimed warm-up
iteration whose FLOPs are counted (``torch.utils.flop_counter``). Ratios are against the baseline that the
reference code runs at: full memory, fp32, eager, the system allocator, and the reference network's avg_pool2d
(every other row uses the library's AvgPool2x2 unless its ``pool`` says otherwise). ``memory=tesla`` rows (TESLA's
constant-memory gradient, approximate) are measured beside the exact modes and marked so. A fidelity row per
cell (tesla's, or bf16's with ``--precisions``) compares the outer gradient with exact fp32's learnable by
learnable (cosine and relative error of the images or factors, the label logits, alpha), since alpha's single
gradient would dominate one cosine over all of them together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mttlss.augment import DSAConfig
from mttlss.distributed import reduce_partial_grads
from mttlss.matching import InnerSteps, batch_schedule, trajectory_loss, unroll_student
from mttlss.models import AvgPool2x2, ParamLayout, build_model, flatten_params, model_spec
from mttlss.parameterization import LowRankSet, PixelSet, solve_budget
from mttlss.runtime import ENV as ALLOCATOR_ENV, PRELOADED_ENV, allocator_plan, find_allocator_library, library_mapped, \
    tune_allocator
from mttlss.training import soft_label_loss

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# pool="avg_pool2d": the network as the reference code builds it (nn.AvgPool2d), not the library's AvgPool2x2
BASELINE = dict(memory="full", precision="fp32", allocator="system", pool="avg_pool2d")


# ---------------------------------------------------------------------------------------------------------
# one variant, in a child process


def _problem(*, ipc: int, classes: int, param: str, device: str, width: int = 128):
    """ConvNet-3 (width 128, the paper's), a synthetic set of IPC images per class's storage, its labels and learnables."""

    torch.manual_seed(0)
    model = build_model(model_spec("convnet", width=width, depth=3), channels=3, num_classes=classes,
                        image_size=(32, 32)).to(device)
    if param == "pixel":
        syn = PixelSet(num_classes=classes, image_shape=(3, 32, 32), images_per_class=ipc)
    else:  # the CIFAR presets' low-rank layout: rank 4 shared mappers at IPC 1, rank 8 per class at IPC 10
        rank, subspaces = (4, "shared") if ipc == 1 else (8, "per_class")
        budget = solve_budget(num_classes=classes, image_shape=(3, 32, 32), ipc=ipc, param="lowrank", rank=rank,
                              subspaces=subspaces)
        syn = LowRankSet(num_classes=classes, image_shape=(3, 32, 32), images_per_class=budget.images_per_class,
                         rank=rank, subspaces=subspaces)
    with torch.no_grad():
        for p in syn.parameters():
            p.normal_(generator=torch.Generator().manual_seed(1))
    syn = syn.to(device)
    layout = ParamLayout.of(model)
    start = flatten_params(model)
    target = start + 0.01 * torch.randn(start.shape, generator=torch.Generator().manual_seed(2)).to(device)
    soft = param == "lowrank"  # MTT-LSS learns soft labels; plain MTT keeps hard ones
    labels = torch.randn(syn.num_images, classes, device=device, requires_grad=True) if soft else None
    return model, layout, syn, labels, start, target


def autocast_network(device_type: str):
    """InnerSteps.network_precision with precision="bf16" as torch.autocast around the network alone (every op's
    output in bf16 where autocast says so; the loss then takes the logits in fp32), the form the library used
    before BF16Products: kept here to measure one against the other."""
    def network_precision(self):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
    return network_precision


def with_reference_pools(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every AvgPool2x2 replaced by a plain nn.AvgPool2d(2, 2) (avg_pool2d, as the reference builds it)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, AvgPool2x2):
                setattr(module, name, torch.nn.AvgPool2d(2, 2))
    return model


def run_variant(args) -> dict:
    if args.allocator == "tuned":
        tune_allocator(force=True)
    elif args.allocator in PRELOADED:  # run_child preloaded it: check that this process really has it
        if not library_mapped(allocator_plan({ALLOCATOR_ENV: args.allocator})["library"]):
            raise SystemExit(f"allocator {args.allocator} was to be preloaded but is not mapped in this process")
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: one distillation over the ranks, gloo on the CPU
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    model, layout, syn, labels, start, target = _problem(ipc=args.ipc, classes=args.classes, param=args.param,
                                                         device=args.device, width=args.width)
    if args.pool == "avg_pool2d":
        model = with_reference_pools(model)
    if args.bf16_form == "autocast":
        InnerSteps.network_precision = autocast_network(torch.device(args.device).type)
    hard = syn.labels_hard().to(args.device)
    syn_lr = torch.tensor(0.01, device=args.device, requires_grad=True)
    learnables = (*syn.parameters(), *([labels] if labels is not None else []))
    opt = torch.optim.SGD([*learnables, syn_lr], lr=1e-3, momentum=0.5)
    batch = min(args.batch_syn or syn.num_images, syn.num_images)

    def label_loss(logits, idx):
        return soft_label_loss(logits, labels[idx]) if labels is not None else F.cross_entropy(logits, hard[idx])

    def iteration(i: int, precision: str = args.precision, memory: str = args.memory) -> tuple[float, list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(i)
        batches = [b.to(args.device) for b in batch_schedule(syn.num_images, batch, args.steps, gen)]
        theta = unroll_student(model, layout, start, decode=lambda idx: syn.decode(idx), label_loss=label_loss,
                               syn_lr=syn_lr, batches=batches, dsa_config=DSAConfig(), generator=gen,
                               memory=memory, learnables=learnables, precision=precision)
        loss = trajectory_loss(theta, start, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reduce_partial_grads(list(learnables))
        grads = [p.grad.detach().clone() for p in (*learnables, syn_lr)]
        return float(loss.detach()), grads

    def synced_time() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    out: dict = {}
    if args.fidelity:  # the same iteration exact in fp32 and in the variant's precision and memory, before any update
        loss32, g32 = iteration(0, "fp32", "checkpoint")
        loss_lp, g_lp = iteration(0, args.precision, args.memory)
        # per learnable (alpha's scalar gradient would dominate one cosine over all of them), in float64: at
        # float32's resolution a cosine this close to 1 rounds to exactly 1
        names = [n for n, _ in syn.named_parameters()] + (["label_logits"] if labels is not None else []) + ["syn_lr"]
        pairs = [(name, a.double().flatten(), b.double().flatten()) for name, a, b in zip(names, g32, g_lp)]
        out["grad_cosines"] = {name: float(F.cosine_similarity(a, b, dim=0)) for name, a, b in pairs if a.numel() > 1}
        out["grad_signs_agree"] = {name: bool(torch.sign(a) == torch.sign(b)) for name, a, b in pairs if a.numel() == 1}
        out["grad_rel_errors"] = {name: float((b - a).norm() / a.norm()) if a.norm() > 0 else None for name, a, b in pairs}
        out["grad_cosine"] = min(out["grad_cosines"].values())
        out["loss_rel_diff"] = abs(loss_lp - loss32) / abs(loss32)
        return out
    if args.iters == 0:  # a memory point: one plain iteration (the FLOP counter's own bookkeeping stays out)
        iteration(0)
        return {"iterations": 1}
    with FlopCounterMode(display=False) as flops:
        iteration(0)
    out["gflop_per_iter"] = flops.get_total_flops() / 1e9
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(1, args.iters + 1):
        t0 = synced_time()
        iteration(i)
        opt.step()
        times.append(synced_time() - t0)
    out["seconds"] = times
    if "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", 0)) != 0:
        return {}  # rank 0 reports
    if args.device.startswith("cuda"):
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    return out


# ---------------------------------------------------------------------------------------------------------
# the driver


def machine() -> dict:
    model = platform.processor()
    flags = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line
    except FileNotFoundError:
        pass
    return {"cpu": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": date.today().isoformat()}


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def run_child(cell: dict, variant: dict, *, iters: int, device: str, fidelity: bool = False) -> dict:
    variant = dict(variant)
    ranks = variant.pop("ranks", 1)
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = launcher + [__file__, "--worker", "--device", device, "--iters", str(iters)]
    for key, value in {**cell, **variant}.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if fidelity:
        cmd.append("--fidelity")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for key in ("LD_PRELOAD", PRELOADED_ENV):  # whatever the caller had preloaded stays out of the comparison
        env.pop(key, None)
    if variant["allocator"] in PRELOADED:  # the library's own plan: LD_PRELOAD and the allocator's settings
        env.update(allocator_plan({ALLOCATOR_ENV: variant["allocator"]})["env"])
    if ranks > 1:  # the cores are shared out: one thread per rank
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // ranks))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return result


def cells(quick: bool, paper: bool) -> tuple[list[dict], list[dict]]:
    """(speed cells, memory series). A cell is the problem; variants run on every cell."""
    if paper:
        speed = [dict(ipc=10, classes=c, param=p, steps=80, batch_syn=b) for c in (10, 100) for p in ("pixel", "lowrank")
                 for b in (100, 1000)]
        return speed, []
    if quick:
        return [dict(ipc=1, classes=10, param="pixel", steps=5, batch_syn=10)], \
               [dict(ipc=1, classes=10, param="pixel", steps=s, batch_syn=10) for s in (5, 10)]
    speed = [dict(ipc=10, classes=10, param=p, steps=20, batch_syn=100) for p in ("pixel", "lowrank")] + \
            [dict(ipc=1, classes=10, param=p, steps=50, batch_syn=10) for p in ("pixel", "lowrank")]
    memory = [dict(ipc=10, classes=10, param="pixel", steps=s, batch_syn=100) for s in (10, 20, 40, 80)]
    return speed, memory


VARIANTS = [
    BASELINE,
    dict(memory="full", precision="fp32", allocator="tuned"),
    dict(memory="checkpoint", precision="fp32", allocator="system"),
    dict(memory="checkpoint", precision="fp32", allocator="tuned"),
]
BF16 = dict(memory="checkpoint", precision="bf16", allocator="tuned")
TESLA = dict(memory="tesla", precision="fp32", allocator="tuned")  # not exact: shown for comparison
TESLA_COMPARISON = [BASELINE, VARIANTS[1], VARIANTS[3], TESLA]  # --tesla
TWO_RANKS = dict(memory="checkpoint", precision="fp32", allocator="tuned", ranks=2)
PRELOADED = ("tcmalloc", "jemalloc")  # allocators preloaded into the child (runtime.exec_with_allocator's way)


def allocator_variants(cell: dict) -> list[dict]:
    """--allocators: the baseline, glibc's mallopt setting and each preloadable allocator this system has, in full
    mode, and in checkpoint mode too where the batch is large (at IPC 1 the allocator was measured not to matter)."""
    names = ["tuned", *[n for n in PRELOADED if find_allocator_library(n)]]
    modes = ("full", "checkpoint") if cell["ipc"] >= 10 else ("full",)
    return [BASELINE, *[dict(memory=m, precision="fp32", allocator=n) for m in modes for n in names]]


# the CIFAR-10 CPU benchmark's MTT-LSS unrolls (benchmarks/cifar10.py): ConvNet-3 width 32, IPC 1 80 steps of 32
# images, IPC 10 40 steps of 50 (where bf16's gain was measured to vanish: precision=auto's threshold)
BENCHMARK_CELLS = [dict(ipc=1, classes=10, param="lowrank", steps=80, batch_syn=32, width=32),
                   dict(ipc=10, classes=10, param="lowrank", steps=40, batch_syn=50, width=32)]


# precision=auto's threshold (distillation.AUTO_BF16_MIN_GFLOP, 0.5 GFLOP a step's forward) sits at 5 images of
# width 128 on 32x32: --threshold measures bf16 there and on the narrow cells above, where auto keeps fp32
THRESHOLD_CELL = dict(ipc=1, classes=10, param="pixel", steps=50, batch_syn=5, width=128)


def threshold_variants(cell: dict) -> list[dict]:
    """--threshold: full mode in fp32 and in bf16 under the command's allocator (no baseline: the ratio that
    matters is bf16's gain at the threshold's sizes)."""
    allocator = command_allocator()
    return [dict(memory="full", precision=p, allocator=allocator) for p in ("fp32", "bf16")]


def command_allocator() -> str:
    """The allocator the mttlss command would run under here (MTTLSS_ALLOCATOR=auto), as a variant's name."""
    name = allocator_plan({ALLOCATOR_ENV: "auto"})["allocator"]
    return name if name in PRELOADED else "tuned" if name == "glibc-tuned" else "system"


def precision_variants(cell: dict) -> list[dict]:
    """--precisions: the baseline, then each exact memory mode in fp32 and in bf16 under the command's allocator,
    so that bf16's gain is measured on top of every other lever, cell by cell."""
    allocator = command_allocator()
    return [BASELINE, *[dict(memory=m, precision=p, allocator=allocator) for p in ("fp32", "bf16")
                        for m in ("full", "checkpoint")]]


def form_variants(cell: dict) -> list[dict]:
    """--forms: the baseline, full fp32, then bf16 (full mode, the command's allocator) in each of its two forms
    (torch.autocast, or BF16Products: only the convolutions and linear layers in bf16) with each pooling
    (avg_pool2d, or the library's AvgPool2x2): the two changes measured apart and together."""
    allocator = command_allocator()
    return [BASELINE, dict(memory="full", precision="fp32", allocator=allocator),
            *[dict(memory="full", precision="bf16", allocator=allocator, bf16_form=form, pool=pool)
              for pool in ("avg_pool2d", "2x2") for form in ("autocast", "products")]]


def pool_microbench(rounds: int = 5, repeats: int = 5) -> list[dict]:
    """Forward + backward of one 2x2 average pool at expert-training shapes (fp32, no double backward), avg_pool2d
    against AvgPool2x2 alternated in this process: what the pooling change does outside the unroll."""
    rows = []
    for shape in ((256, 128, 32, 32), (256, 128, 16, 16), (256, 128, 8, 8)):
        x0 = torch.randn(shape)
        times: dict[str, list[float]] = {"avg_pool2d": [], "2x2": []}
        for _ in range(rounds):
            for name, pool in (("avg_pool2d", torch.nn.AvgPool2d(2, 2)), ("2x2", AvgPool2x2())):
                x = x0.clone().requires_grad_(True)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    pool(x).sum().backward()
                times[name].append((time.perf_counter() - t0) / repeats)
        rows.append({"shape": list(shape), **{f"ms_{k}": 1e3 * statistics.median(v) for k, v in times.items()}})
        print(f"  pool {shape}: avg_pool2d {rows[-1]['ms_avg_pool2d']:.2f} ms, AvgPool2x2 {rows[-1]['ms_2x2']:.2f} ms",
              flush=True)
    return rows


def variants_for(cell: dict, paper: bool) -> list[dict]:
    """All variants on the pixel cells; the low-rank cells (slower decode, same network) get the baseline and the
    fast modes; two ranks of one thread against one process of two threads where the batch is large."""
    if paper:
        return [BASELINE, VARIANTS[3], TESLA]
    chosen = VARIANTS if cell["param"] == "pixel" else [VARIANTS[0], VARIANTS[1], VARIANTS[3]]
    return chosen + [TESLA] + ([TWO_RANKS] if cell["param"] == "pixel" and (cell["ipc"] >= 10 or cell["steps"] <= 5) else [])


def _key(d: dict) -> str:
    return "/".join(f"{k}={v}" for k, v in d.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--paper", action="store_true", help="paper sizes (GPU): CIFAR-10/100 IPC 10, syn_steps 80")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds per variant (median over them)")
    ap.add_argument("--iters", type=int, default=1, help="timed iterations per child, after the warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full-memory-limit-gib", type=float, default=18.0,
                    help="skip full mode where the fit of the shorter unrolls projects more than this (the machine has 24)")
    ap.add_argument("--skip-bf16", action="store_true", help="skip the bf16 rows (20x slower where bf16 is not native)")
    mode = ap.add_mutually_exclusive_group()  # one record per run: its name says which of these it is
    mode.add_argument("--memory-only", action="store_true", help="only the memory series (peak RSS does not depend on load)")
    mode.add_argument("--tesla", action="store_true", help="only tesla against full and checkpoint (tuned), pixel cells")
    mode.add_argument("--allocators", action="store_true",
                      help="only the allocators (system, glibc mallopt, tcmalloc, jemalloc where installed), pixel cells")
    mode.add_argument("--precisions", action="store_true",
                      help="only fp32 against bf16 in each exact memory mode, every speed cell, the command's allocator; "
                           "a fidelity row (outer-gradient cosine against exact fp32) per cell")
    mode.add_argument("--forms", action="store_true",
                      help="only bf16's two forms (autocast, BF16Products) x the two poolings (avg_pool2d, AvgPool2x2) in full "
                           "mode beside the baseline and full fp32, every speed cell; a fidelity row per cell for the library's bf16")
    mode.add_argument("--threshold", action="store_true",
                      help="only fp32 against bf16 (full mode) at precision=auto's threshold (5 images of width 128) and "
                           "on the CPU benchmark's width-32 cells, where auto keeps fp32")
    ap.add_argument("--fidelity-only", action="store_true",
                    help="only the fidelity rows (bf16's with --precisions, else tesla's): no timing")
    ap.add_argument("--out", default=None)
    # the child's arguments
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, kind in (("ipc", int), ("classes", int), ("param", str), ("steps", int), ("batch-syn", int),
                       ("memory", str), ("precision", str), ("allocator", str)):
        ap.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--pool", choices=("2x2", "avg_pool2d"), default="2x2", help=argparse.SUPPRESS)
    ap.add_argument("--bf16-form", choices=("products", "autocast"), default="products", help=argparse.SUPPRESS)
    ap.add_argument("--fidelity", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = run_variant(args)
        if result:
            print(json.dumps(result))
        return

    info = machine()
    info["matmul_gflops_fp32"] = matmul_gflops(torch.float32, args.device)
    # bf16 at a smaller size: without native bf16 (AMD EPYC here) a 2048^3 product takes minutes
    info["matmul_gflops_bf16"] = matmul_gflops(torch.bfloat16, args.device, n=512, repeats=3)
    print(f"# {info['cpu']} (amx_bf16={info['amx_bf16']}, avx512_bf16={info['avx512_bf16']}), {info['cores']} cores, torch {info['torch']} "
          f"{info['torch_threads']} threads; matmul {info['matmul_gflops_fp32']:.0f} GFLOP/s fp32, "
          f"{info['matmul_gflops_bf16']:.0f} bf16", flush=True)
    speed_cells, memory_series = cells(args.quick, args.paper)
    if args.tesla:
        speed_cells, memory_series = [c for c in speed_cells if c["param"] == "pixel"], []
        args.skip_bf16 = True
    if args.allocators:
        speed_cells, memory_series = [c for c in speed_cells if c["param"] == "pixel"], []
        args.skip_bf16 = True
    if args.precisions:  # bf16 on every cell, not only on the cheap one, and on the CPU benchmark's narrow network
        memory_series, args.skip_bf16 = [], True
        speed_cells += [] if args.quick or args.paper else BENCHMARK_CELLS
    if args.forms:
        memory_series, args.skip_bf16 = [], True
        info["pool_microbench"] = pool_microbench()
    if args.threshold:
        speed_cells, memory_series, args.skip_bf16 = [*BENCHMARK_CELLS, THRESHOLD_CELL], [], True
    rounds = 0 if args.memory_only or args.fidelity_only else 1 if args.quick else args.rounds
    if args.fidelity_only:
        memory_series, args.skip_bf16 = [], True
    rows: dict[str, dict] = {}

    def record(kind: str, cell: dict, variant: dict, res: dict) -> None:
        variant = {"pool": "2x2", **variant}  # the worker's default, named in every row
        row = rows.setdefault(_key({"kind": kind, **cell, **variant}), {"kind": kind, **cell, **variant, "runs": []})
        row["runs"].append(res)
        if res.get("seconds"):
            shown = f"{statistics.median(res['seconds']):.2f} s/iter, {res['peak_rss_gib']:.2f} GiB"
        elif "peak_rss_gib" in res:
            shown = f"{res['peak_rss_gib']:.2f} GiB" + (f", grad cosine {res['grad_cosine']:.5f}" if "grad_cosine" in res else "")
        else:
            shown = str(res)
        print(f"  {kind:6s} {_key(cell)} {_key(variant)}: {shown}", flush=True)

    for r in range(rounds):
        print(f"# round {r + 1}/{rounds}", flush=True)
        for cell in speed_cells:
            chosen = threshold_variants(cell) if args.threshold else TESLA_COMPARISON if args.tesla else \
                allocator_variants(cell) if args.allocators else precision_variants(cell) if args.precisions else \
                form_variants(cell) if args.forms else variants_for(cell, args.paper)
            for variant in chosen:
                record("speed", cell, variant, run_child(cell, variant, iters=args.iters, device=args.device))
    # memory: one iteration per point; full mode only where a linear fit of its shorter unrolls fits the machine
    full_points: list[tuple[int, float]] = []
    for cell in memory_series:
        for variant in (VARIANTS[3], dict(memory="full", precision="fp32", allocator="tuned")):
            if variant["memory"] == "full" and len(full_points) >= 2:
                (s0, m0), (s1, m1) = full_points[-2:]
                projected = m1 + (m1 - m0) / (s1 - s0) * (cell["steps"] - s1)
                if projected > args.full_memory_limit_gib:
                    record("memory", cell, variant, {"skipped": f"projected {projected:.1f} GiB peak RSS"})
                    continue
            res = run_child(cell, variant, iters=0, device=args.device)
            if variant["memory"] == "full" and "peak_rss_gib" in res:
                full_points.append((cell["steps"], res["peak_rss_gib"]))
            record("memory", cell, variant, res)
    if not args.skip_bf16 and not args.paper and not args.memory_only:  # fidelity and speed of bf16 on the cheap cell
        cell = dict(ipc=1, classes=10, param="pixel", steps=5 if args.quick else 50, batch_syn=10)
        record("bf16", cell, BF16, run_child(cell, BF16, iters=args.iters, device=args.device))
        record("fidelity", cell, BF16, run_child(cell, BF16, iters=0, device=args.device, fidelity=True))
    if args.precisions or args.forms:  # how far bf16's gradient is from the exact fp32 one, per speed cell
        for cell in speed_cells:
            for variant in precision_variants(cell)[3:] if args.precisions else form_variants(cell)[-1:]:
                record("fidelity", cell, variant, run_child(cell, variant, iters=0, device=args.device, fidelity=True))
    elif not (args.memory_only or args.allocators or args.threshold):  # how far TESLA's gradient is from the exact one
        for cell in speed_cells:
            record("fidelity", cell, TESLA, run_child(cell, TESLA, iters=0, device=args.device, fidelity=True))

    table = summarise(rows, info)
    stamp = info["date"]
    kind = "quick_" if args.quick else "memory_" if args.memory_only else "tesla_" if args.tesla else \
        "allocators_" if args.allocators else "precisions_" if args.precisions else "forms_" if args.forms else \
        "threshold_" if args.threshold else ""
    kind += "fidelity_" if args.fidelity_only else ""
    out = Path(args.out) if args.out else RESULTS / f"speed_{args.device.split(':')[0]}_{kind}{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": list(rows.values())}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}")


def summarise(rows: dict[str, dict], info: dict) -> str:
    base = {}
    for row in rows.values():
        if row["kind"] == "speed" and all({**row, "pool": _pool_of(row)}.get(k) == v for k, v in BASELINE.items()):
            base[_cell_of(row)] = _median(row)
    lines = [f"CPU: {info['cpu']} (amx_bf16={info['amx_bf16']}, avx512_bf16={info.get('avx512_bf16')}), torch {info['torch']}, {info['torch_threads']} threads, "
             f"{info['date']}; matmul {info['matmul_gflops_fp32']:.0f} GFLOP/s fp32, {info['matmul_gflops_bf16']:.0f} bf16",
             "", "| kind | IPC | classes | width | param | syn_steps | batch_syn | memory | precision | allocator | ranks "
             "| pool | s/iter (median) | x baseline | GFLOP/s | peak RSS GiB | note |", "|" + "---|" * 17]
    for row in rows.values():
        med = _median(row)
        b = base.get(_cell_of(row))
        runs = [r for r in row["runs"] if "peak_rss_gib" in r]
        rss = max((r["peak_rss_gib"] for r in runs), default=None)
        gflop = runs[0].get("gflop_per_iter") if runs else None
        note = "; ".join(str(r.get("skipped") or r.get("error") or "") for r in row["runs"] if "skipped" in r or "error" in r)
        if row["kind"] == "fidelity" and runs:
            per = runs[0].get("grad_cosines", {})
            errors = runs[0].get("grad_rel_errors", {})
            signs = runs[0].get("grad_signs_agree", {})
            shown = ", ".join([f"{name} {cos:.5f} (rel err {_fmt_error(errors.get(name))})" for name, cos in per.items()]
                              + [f"{name}: sign {'agrees' if same else 'DIFFERS'} (rel err {_fmt_error(errors.get(name))})"
                                 for name, same in signs.items()])
            note = (f"against exact fp32: grad cosine, least over the learnables {runs[0]['grad_cosine']:.5f}"
                    f"{' (' + shown + ')' if shown else ''}; loss rel diff {runs[0]['loss_rel_diff']:.2e}")
        if row["memory"] == "tesla":
            note = "; ".join(filter(None, ["approximate gradient (TESLA)", note]))
        if runs and "peak_gpu_gib" in runs[0]:
            note += f" {runs[0]['gpu']}: peak {runs[0]['peak_gpu_gib']:.2f} GiB"
        lines.append(" | ".join([
            f"| {row['kind']}", str(row["ipc"]), str(row["classes"]), str(row.get("width", 128)), row["param"],
            str(row["steps"]), str(row["batch_syn"]),
            row["memory"], row["precision"] + (f" ({row['bf16_form']})" if "bf16_form" in row else ""), row["allocator"],
            str(row.get("ranks", 1)), _pool_of(row), f"{med:.2f}" if med else "-",
            f"{b / med:.2f}" if med and b else "-", f"{gflop / med:.1f}" if med and gflop else "-",
            f"{rss:.2f}" if rss else "-", note]) + " |")
    for bench in info.get("pool_microbench", []):
        lines.append(f"\npool forward + backward, fp32, {bench['shape']}: avg_pool2d {bench['ms_avg_pool2d']:.2f} ms, "
                     f"AvgPool2x2 {bench['ms_2x2']:.2f} ms ({bench['ms_avg_pool2d'] / bench['ms_2x2']:.2f}x)")
    return "\n".join(lines)


def _pool_of(row: dict) -> str:
    """A row's pooling; rows recorded before AvgPool2x2 existed name none and used nn.AvgPool2d."""
    return row.get("pool", "avg_pool2d")


def _fmt_error(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def _cell_of(row: dict) -> tuple:
    return row["ipc"], row["classes"], row.get("width", 128), row["param"], row["steps"], row["batch_syn"]


def _median(row: dict) -> float | None:
    seconds = [statistics.median(r["seconds"]) for r in row["runs"] if r.get("seconds")]
    return statistics.median(seconds) if seconds else None


if __name__ == "__main__":
    main()
