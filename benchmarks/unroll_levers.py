"""Levers for the small-batch unroll that memory modes and the allocator do not reach (speed.py's IPC 1 /
syn_steps 50 cell: ConvNet-3 width 128, 10 CIFAR images per inner step), measured side by side.

    python benchmarks/unroll_levers.py --record      # about 6 min on 2 CPU cores

Two parts, each alternating its variants round by round in one run (medians over rounds):

1. **Kernels**: one full-mode unroll of ``--steps`` inner steps of the library's ConvNet-3 (``functional_call``
   on named views, as ``mttlss.matching`` does), then the outer backward into the images [B, 3, 32, 32] and
   alpha. Variants change only how one inner gradient is computed (system allocator, ``--steps`` 10 by default):
   - ``eager``: ``torch.autograd.grad(create_graph=True)``, what ``memory=full`` runs;
   - ``compile``: ``torch.compile(torch.func.grad(loss))``, the inner gradient as one compiled function whose
     own backward is first order for the compiler (its first call, which compiles, is timed apart);
   - ``channels_last``: images and convolution weights in channels-last memory format;
   - ``gemm_conv``: every convolution as ``unfold`` + one matrix product (im2col), whose double backward is
     matrix products too.
   - ``func_grad``: ``torch.func.grad(loss)`` uncompiled, the compiled variant's own code path;
   - ``reshape_pool``: every 2x2 average pool as a reshape and a mean, whose backward is an expand;
   - ``explicit_norm``: every instance norm (GroupNorm with one channel per group) as mean / variance / scale
     operations, whose double backward is elementwise products instead of group norm's composite formula;
   - ``halves_in_parallel``: two processes of one thread, each pinned to its own core, each doing the eager unroll
     on half of the images at the same moment (the row is the slower one): what two torchrun ranks could reach
     with all-reduces that cost nothing.
   The image gradient of each row is compared with the same unroll in float64 (eager), so the table shows how far
   each float32 variant is from the exact value, not only from another float32 order of sums. The weights are
   made channels-last inside each inner step, as the library's flat parameter vector [P] would need.
2. **Ranks**: speed.py's IPC 1 / syn_steps 50 pixel cell in full mode, one process of two threads against two
   torchrun ranks of one thread (gloo), each rank taking half of every inner batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar10  # noqa: E402  (write_record)
import speed  # noqa: E402  (machine(), run_child: the same worker as the speed table)
from mttlss.models import build_model, model_spec  # noqa: E402


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters) computed as im2col: unfold [B, C*k*k, L], one matmul with weight [O, C*k*k]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # [B, C*k*k, L]
        out = self.weight.flatten(1) @ cols + self.bias.view(1, -1, 1)  # [B, O, L]
        kh, kw = self.kernel_size
        oh = (h + 2 * self.padding[0] - kh) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - kw) // self.stride[1] + 1
        return out.view(b, -1, oh, ow)


def _with_modules(model: nn.Module, swap) -> nn.Module:
    """A copy of ``model`` in which every child ``swap`` maps to a module is replaced by it (same names)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            new = swap(child)
            if new is not None:
                setattr(module, child_name, new)
    return model


def with_gemm_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Conv2d layers are GemmConv2d (same names, so the same parameter views)."""
    def swap(m):
        if type(m) is nn.Conv2d:
            gemm = GemmConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding)
            gemm.load_state_dict(m.state_dict())
            return gemm
        return None

    return _with_modules(model, swap)


class ReshapePool2d(nn.Module):
    """nn.AvgPool2d(2) (stride 2, no padding) as a reshape and a mean: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


class ExplicitInstanceNorm(nn.GroupNorm):
    """nn.GroupNorm(C, C) (same parameters) written as its mean, variance and scale over each [H, W] plane."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, H, W]
        mean = x.mean(dim=(2, 3), keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=(2, 3), keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1)
        return centred * scale + self.bias.view(1, -1, 1, 1)


def with_reshape_pools(model: nn.Module) -> nn.Module:
    return _with_modules(model, lambda m: ReshapePool2d() if isinstance(m, nn.AvgPool2d) and m.kernel_size == 2
                         and m.stride == 2 and m.padding == 0 else None)


def with_explicit_norms(model: nn.Module) -> nn.Module:
    def swap(m):
        if type(m) is nn.GroupNorm and m.num_groups == m.num_channels and m.affine:
            norm = ExplicitInstanceNorm(m.num_groups, m.num_channels, eps=m.eps)
            norm.load_state_dict(m.state_dict())
            return norm
        return None

    return _with_modules(model, swap)


def loss_of(net: nn.Module):
    """fn(params, x, y) -> the cross-entropy of ``net`` on x [B, 3, H, W] with the named ``params``."""
    return lambda params, x, y: F.cross_entropy(functional_call(net, params, (x,)), y)


def eager_gradient(net: nn.Module):
    """fn(params, x, y) -> {name: grad}, by ``torch.autograd.grad(create_graph=True)`` as memory=full does."""
    loss = loss_of(net)
    return lambda params, x, y: dict(zip(params, torch.autograd.grad(loss(params, x, y), list(params.values()),
                                                                     create_graph=True)))


def inner_gradients(model: nn.Module, *, compile: bool = True):
    """{variant: fn(params, x, y) -> grads}: one inner gradient of the cross-entropy, graph kept for the outer pass
    (``compile=False`` leaves out the compiled variant, which takes about a minute to compile)."""
    eager = eager_gradient(model)

    def channels_last(params, x, y):
        cl = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in params.items()}
        return eager(cl, x.contiguous(memory_format=torch.channels_last), y)

    fns = {"eager": eager, "channels_last": channels_last, "gemm_conv": eager_gradient(with_gemm_convs(model)),
           "func_grad": torch.func.grad(loss_of(model)), "reshape_pool": eager_gradient(with_reshape_pools(model)),
           "explicit_norm": eager_gradient(with_explicit_norms(model))}
    return {**fns, "compile": torch.compile(torch.func.grad(loss_of(model)))} if compile else fns


def unroll(grad_fn, start: dict, images: torch.Tensor, labels: torch.Tensor, steps: int):
    """theta_N after ``steps`` SGD steps, each on all of ``images`` [N, 3, 32, 32] in a new order (IPC 1, batch_syn
    10), then dL/d(images) and dL/dalpha."""
    x = images.detach().clone().requires_grad_(True)
    alpha = torch.tensor(0.01, dtype=images.dtype, requires_grad=True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in start.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=gen)
        grads = grad_fn(params, x[idx], labels[idx])
        params = {k: p - alpha * grads[k] for k, p in params.items()}
    loss = sum(((params[k] - start[k]) ** 2).sum() for k in params)
    loss.backward()
    return x.grad, alpha.grad


def _problem():
    """The kernels part's network (ConvNet-3 width 128, seeded), its start {name: tensor}, 10 images and labels."""
    torch.manual_seed(0)
    model = build_model(model_spec("convnet", width=128, depth=3), channels=3, num_classes=10, image_size=(32, 32))
    start = {k: v.detach() for k, v in model.named_parameters()}
    images = torch.randn(10, 3, 32, 32)  # one per class, training space
    return model, start, images, torch.arange(10)


def half_worker(half: int, *, steps: int, at: float) -> None:
    """One of the two halves_in_parallel processes: one thread on core ``half``, the eager unroll of images
    [5 * half : 5 * half + 5], timed from wall-clock time ``at`` (both start together); prints its seconds."""
    os.sched_setaffinity(0, {half % (os.cpu_count() or 1)})
    torch.set_num_threads(1)
    model, start, images, labels = _problem()
    grad_fn, mine = eager_gradient(model), slice(5 * half, 5 * half + 5)
    unroll(grad_fn, start, images[mine], labels[mine], steps)  # warm-up
    late = time.time() > at
    time.sleep(max(0.0, at - time.time()))
    t0 = time.perf_counter()
    unroll(grad_fn, start, images[mine], labels[mine], steps)
    print(json.dumps({"seconds": time.perf_counter() - t0, "late": late}))


def halves_in_parallel(*, steps: int, lead_s: float = 15.0) -> float:
    """Seconds of the slower of the two half_worker processes, started ``lead_s`` from now."""
    at = time.time() + lead_s
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--half-worker", str(half), "--steps", str(steps), "--at",
                               str(at)], stdout=subprocess.PIPE, text=True, env=env) for half in (0, 1)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if any(o["late"] for o in outs) or any(p.returncode for p in procs):
        raise SystemExit("a halves_in_parallel worker was not ready in time; raise lead_s")
    return max(o["seconds"] for o in outs)


def kernels_part(*, steps: int, rounds: int) -> list[dict]:
    model, start, images, labels = _problem()
    fns = inner_gradients(model)
    exact = copy.deepcopy(model).double()
    reference, _ = unroll(eager_gradient(exact), {k: v.double() for k, v in start.items()},
                          images.double(), labels, steps)
    reference = reference.float()
    rows = {name: {"variant": name, "seconds": []} for name in [*fns, "halves_in_parallel"]}
    t0 = time.perf_counter()
    unroll(fns["compile"], start, images, labels, steps)  # compiles
    rows["compile"]["first_call_seconds"] = time.perf_counter() - t0
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            gx, _ = unroll(fn, start, images, labels, steps)
            rows[name]["seconds"].append(time.perf_counter() - t0)
            rows[name]["image_grad_rel_diff_fp64"] = float((gx - reference).norm() / reference.norm())
        rows["halves_in_parallel"]["seconds"].append(halves_in_parallel(steps=steps))
    base = statistics.median(rows["eager"]["seconds"])
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
        row["x_eager"] = base / row["median_s"]
    return list(rows.values())


def ranks_part(*, rounds: int, iters: int) -> list[dict]:
    cell = dict(ipc=1, classes=10, param="pixel", steps=50, batch_syn=10)
    variants = {"1 process x 2 threads": dict(memory="full", precision="fp32", allocator="tuned"),
                "2 ranks x 1 thread": dict(memory="full", precision="fp32", allocator="tuned", ranks=2)}
    rows = {name: {"variant": name, "seconds": [], "peak_rss_gib": []} for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            out = speed.run_child(cell, variant, iters=iters, device="cpu")
            if "error" in out:
                raise SystemExit(f"{name}: {out['error']}")
            rows[name]["seconds"] += out["seconds"]
            rows[name]["peak_rss_gib"].append(out["peak_rss_gib"])
    base = statistics.median(rows["1 process x 2 threads"]["seconds"])
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
        row["x_one_process"] = base / row["median_s"]
    return list(rows.values())


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"CPU: {m['cpu']} (amx_bf16={m['amx_bf16']}), torch {m['torch']}, {m['torch_threads']} threads, {m['date']}",
             "", f"Kernels: full-mode unroll of {report['steps']} inner steps of 10 images "
             "(ConvNet-3 width 128), outer backward included", "",
             "| variant | s per unroll (median) | x eager | image-gradient rel. diff to float64 | note |",
             "|---|---|---|---|---|"]
    for r in report["kernels"]:
        note = f"first call (compiling) {r['first_call_seconds']:.1f} s" if "first_call_seconds" in r else \
            "2 processes x 1 thread, 5 images each, no communication; the slower one" \
            if r["variant"] == "halves_in_parallel" else ""
        diff = f"{r['image_grad_rel_diff_fp64']:.1e}" if "image_grad_rel_diff_fp64" in r else "-"
        lines.append(f"| {r['variant']} | {r['median_s']:.3f} | {r['x_eager']:.2f} | {diff} | {note} |")
    lines += ["", "Ranks: speed.py's IPC 1 / syn_steps 50 pixel cell (batch 10), memory=full, tuned allocator", "",
              "| variant | s/iter (median) | x one process | peak RSS GiB (rank 0 or the process) |", "|---|---|---|---|"]
    for r in report["ranks"]:
        lines.append(f"| {r['variant']} | {r['median_s']:.2f} | {r['x_one_process']:.2f} | {max(r['peak_rss_gib']):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="inner steps per unroll in the kernels part")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rank-rounds", type=int, default=2, help="alternated rounds in the ranks part")
    ap.add_argument("--rank-iters", type=int, default=3, help="timed iterations per child in the ranks part")
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/unroll_levers_<cpu>_<date>")
    ap.add_argument("--half-worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--at", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.half_worker is not None:
        half_worker(args.half_worker, steps=args.steps, at=args.at)
        return 0
    report = {"machine": speed.machine(), "steps": args.steps,
              "kernels": kernels_part(steps=args.steps, rounds=args.rounds),
              "ranks": ranks_part(rounds=args.rank_rounds, iters=args.rank_iters)}
    text = table(report)
    print(text)
    if args.record:
        cifar10.write_record(f"unroll_levers_cpu_{report['machine']['date']}", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
