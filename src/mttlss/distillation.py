"""The distillation loop: optimise a synthetic set so that students trained on it follow the experts.

Read top to bottom: ``distill()`` sets up (experts, data, model: ``_setup``), starts from a checkpoint or a
fresh synthetic set with its labels and optimisers (``_start``), then per iteration runs ``outer_step()``,
validates now and then, hands the record to the sinks (``records.py``: log.jsonl, progress bar, TensorBoard)
and checkpoints atomically; finally it writes the artifact of the synthetic set selected on the validation
split (``_finish``). With ema_decay, validation, selection and the artifact use an EMA of the set (``ema.py``).

Every iteration's randomness (which expert, start epoch, minibatches, DSA) comes from a generator seeded by
(seed, iteration), so a resumed run repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.flop_counter import FlopCounterMode

from mttlss.artifact import save_artifact
from mttlss.augment import DSAConfig
from mttlss.config import DistillConfig
from mttlss.data import RealData, dataset_record, load_recorded
from mttlss.distributed import init_distributed, reduce_partial_grads, world
from mttlss.ema import averaged_set, ema_state, new_ema, update_ema
from mttlss.errors import UserError
from mttlss.experts import ExpertSet
from mttlss.initialization import init_synthetic
from mttlss.io_utils import StopRequest, atomic_torch_save, atomic_write_text
from mttlss.labels import (check_label_storage, compact_labels, experts_mean_logits, label_candidates, label_stats,
                           raise_own_class)
from mttlss.matching import (
    EXACT_MEMORY_MODES,
    PRECISIONS,
    InnerSteps,
    batch_schedule,
    graph_bytes_per_step,
    sample_start_epoch,
    start_epoch_upper,
    trajectory_loss,
    unroll_student,
)
from mttlss.models import ParamLayout, build_model, has_buffers
from mttlss.parameterization import SyntheticSet, build_synthetic_set
from mttlss.preprocessing import Preprocessor
from mttlss.records import open_sinks, require_extras
from mttlss.runtime import allocator_status, available_memory_bytes, describe_allocator, native_bf16_flag
from mttlss.training import EvalRecipe, evaluate_synthetic, label_loss, soft_targets

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
ARTIFACT = "synthetic.safetensors"
# knobs to settle before resuming a run: everything that changes what an iteration computes
# (memory is not among them: full and checkpoint compute the same gradients; tesla, which does not, is checked apart)
_RESUMABLE_CHANGES = {"iterations", "stop_after", "device", "tensorboard", "wandb", "checkpoint_every", "grid_every", "memory",
                      "force"}
# knobs that only shape iteration 0 (the labels' start): a checkpoint written before they existed is past its start,
# so their values are not compared with it; any other knob it lacks compares as its default (the older behaviour)
_START_ONLY = {"labels", "label_init", "label_temperature", "label_confidence", "threshold_probe"}
# precision=auto takes bf16 on a CPU with native bf16 only where one inner step's forward costs at least this many
# GFLOP. Measured on a 2-core AMD EPYC with avx512_bf16 (Zen 4), bf16 against fp32 under the same allocator, full
# mode, medians of 3 alternated rounds, bf16 as matching.BF16Products (python benchmarks/speed.py --threshold,
# benchmarks/results/speed_cpu_threshold_2026-12-02.md): ConvNet-3 width 128, 5 images a step (0.51 GFLOP, the
# threshold): 1.41x; the CIFAR CPU benchmark's width 32, batches of 32 (0.25 GFLOP): 1.04x, of 50 (0.38 GFLOP):
# 1.17x, too little for an inexact gradient. Larger steps gain more: width 128, 10 images (1.0 GFLOP) 1.40-1.50x,
# 100 images (10 GFLOP) 1.54-1.62x over fp32 (speed_cpu_forms_2026-12-02.md). Under the earlier autocast form the
# width-32 cells gave 0.95x and 1.10x and the digits quickstart (width 32 on 8x8) 0.86-1.0x. Per learnable, the
# outer gradient's cosine with fp32's was 0.992-0.999 on those cells.
# On a 2-core Intel Xeon with AMX (amx_bf16) the same full-mode comparison gave 1.21-1.45x at width 128 with 10
# images and 1.27-1.34x with 100 (speed_cpu_forms_amx_2026-12-02.md); the threshold's cells were not rerun there.
AUTO_BF16_MIN_GFLOP = 0.5


class DistillError(UserError, RuntimeError):
    """The run cannot go on; the message names the knobs to change."""


@dataclass(kw_only=True)
class DistillState:
    """Everything a checkpoint holds: the resume point."""

    iteration: int
    synthetic: SyntheticSet
    label_logits: torch.Tensor | None   # [n, classes] learnable soft labels, or None for hard labels
    syn_lr: torch.Tensor                # alpha, 0-dim, learnable
    optimizers: dict[str, torch.optim.Optimizer]
    consecutive_skips: int = 0
    total_skips: int = 0
    best: dict[str, Any] = field(default_factory=dict)   # {"iteration", "val_acc", "synthetic", "labels", "lr"}
    ema: AveragedModel | None = None    # ema_decay: the EMA of the synthetic set's parameters (``ema.py``), else None


@dataclass(kw_only=True)
class DistillResult:
    out: Path | None
    artifact: Path | None
    synthetic: SyntheticSet
    labels: torch.Tensor                # logits [n, classes] as the artifact stores them, or hard [n]
    syn_lr: float
    selection: dict
    history: list[dict]
    init_info: dict = field(default_factory=dict)   # budget, reconstruction error, labels' start, initial val accuracy


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What stays fixed for a whole run: every iteration reads it, none changes it."""

    cfg: DistillConfig
    experts: ExpertSet
    data: RealData
    pre: Preprocessor                   # pixel [0, 1] -> the experts' training space
    model: nn.Module                    # the experts' network; its parameters come from flat vectors [P]
    layout: ParamLayout
    device: str
    x_val: torch.Tensor                 # [N_val, C, H, W] training space
    dsa_config: DSAConfig | None
    out: Path | None
    is_main: bool = True                # under torchrun only rank 0 writes (log, checkpoints, artifact)
    memory: str = "full"                # the resolved memory mode: "full" | "checkpoint" | "tesla" (approximate)
    precision: str = "fp32"             # the resolved precision of the student network: "fp32" | "bf16"
    threshold: float | None = None      # the update guard's tau as settled at the start (``settle_guard``); None: cfg's


# ---------------------------------------------------------------------------------------------------------
# set-up


def _check_segments(cfg: DistillConfig, experts: ExpertSet) -> None:
    need = cfg.max_start_epoch - 1 + cfg.expert_epochs
    if need > experts.epochs:
        raise DistillError(
            f"max_start_epoch - 1 + expert_epochs = {need} exceeds the {experts.epochs} epochs stored per expert; "
            f"lower max_start_epoch / expert_epochs or train experts with --epochs {need}"
        )


def _setup(config: DistillConfig, *, experts: str | Path | ExpertSet, out: str | Path | None,
           data: RealData | None) -> tuple[_Run, dict]:
    """The run's fixed parts, and what was chosen for the user on the way (batch_syn when unset)."""
    cfg = config.validate()
    require_extras(cfg)  # a missing extra (wandb) fails here, not after the initialisation
    experts = experts if isinstance(experts, ExpertSet) else ExpertSet(experts)
    _check_segments(cfg, experts)
    chosen: dict[str, Any] = {}
    if cfg.batch_syn is None:
        b, why = default_batch_syn(cfg, int(experts.dataset["num_classes"]))
        cfg, chosen["batch_syn"] = replace(cfg, batch_syn=b), {"value": b, "why": why}
    dist = init_distributed(cfg.device)  # one process, or this torchrun rank (and its GPU)
    device = dist.device
    if cfg.batch_syn is not None and cfg.batch_syn < dist.world_size:
        raise DistillError(f"batch_syn={cfg.batch_syn} is smaller than the {dist.world_size} ranks that share each batch; "
                           f"raise batch_syn or launch fewer ranks")
    data = data if data is not None else load_recorded(experts.dataset, source=f"the experts in {experts.folder}")
    if cfg.label_mode != "hard":  # label_topk against the classes, before the initialisation's minutes
        check_label_storage(num_classes=data.num_classes, dtype=cfg.label_dtype, topk=cfg.label_topk)
    pre = experts.preprocessor().to(device)
    model = build_model(experts.model, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size).to(device)
    layout = experts.check_model(model)
    if has_buffers(model):
        raise DistillError(f"model {experts.model['name']} has buffers (BatchNorm); trajectory matching needs a buffer-free "
                           "network such as convnet with instancenorm")
    return _Run(cfg=cfg, experts=experts, data=data, pre=pre, model=model, layout=layout, device=device,
                x_val=pre(data.x_val.to(device)), dsa_config=DSAConfig(strategy=cfg.dsa_strategy) if cfg.dsa else None,
                out=Path(out) if out is not None else None, is_main=dist.is_main), chosen


def _optimizers(cfg: DistillConfig, *, syn: SyntheticSet, label_logits: torch.Tensor | None,
                syn_lr: torch.Tensor) -> dict[str, torch.optim.Optimizer]:
    groups = syn.parameter_groups()
    if "images" in groups:
        factor_groups = [{"params": groups["images"], "lr": cfg.lr_img}]
    else:
        per_subspace = syn.num_images / syn.describe().get("num_subspaces_total", 1)
        lr_mapper = cfg.lr_mapper if cfg.lr_mapper is not None else cfg.lr_img / max(1.0, per_subspace)
        factor_groups = [{"params": groups["codes"], "lr": cfg.lr_img}, {"params": groups["mappers"], "lr": lr_mapper}]
    opts = {
        "synthetic": torch.optim.SGD(factor_groups, lr=cfg.lr_img, momentum=cfg.momentum_img),
        "lr": torch.optim.SGD([syn_lr], lr=cfg.lr_lr, momentum=0.5),
    }
    if label_logits is not None:
        opts["labels"] = torch.optim.SGD([label_logits], lr=cfg.lr_y, momentum=cfg.label_momentum)
    for opt in opts.values():  # the schedule's base (the name torch's own lr schedulers use)
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def lr_factor(schedule: str, iteration: int, iterations: int) -> float:
    """Multiplier on the synthetic set's and the labels' learning rates at outer iteration ``iteration``."""
    if schedule == "constant" or iterations <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration, iterations) / iterations))  # cosine: 1 at 0, 0 at the end


def _schedule_lrs(cfg: DistillConfig, state: DistillState) -> float:
    """Set this iteration's learning rates from each group's ``initial_lr`` (alpha's own lr, eta_alpha, is not
    scheduled) and return the factor. A function of the iteration alone, so a resumed run continues the schedule."""
    factor = lr_factor(cfg.lr_schedule, state.iteration, cfg.iterations)
    for name, opt in state.optimizers.items():
        if name != "lr":
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
    return factor


def _fresh_state(run: _Run, *, x_train: torch.Tensor) -> tuple[DistillState, dict]:
    """Iteration 0 before its labels: the synthetic set initialised from ``x_train`` [N, C, H, W] (training space),
    alpha at lr_teacher, no label logits and no optimisers yet (``_start`` chooses the labels, then builds them)."""
    cfg, experts, device = run.cfg, run.experts, run.device
    syn, info = init_synthetic(cfg, data=run.data, x_train=x_train, model=run.model, layout=run.layout,
                               experts=experts, device=device)
    syn_lr = torch.tensor(cfg.lr_teacher, device=device, requires_grad=True)
    return DistillState(iteration=0, synthetic=syn, label_logits=None, syn_lr=syn_lr, optimizers={},
                        ema=new_ema(syn, cfg.ema_decay)), info


def _soft_candidates(run: _Run, syn: SyntheticSet) -> tuple[list[tuple[float, torch.Tensor]], dict]:
    """The class-faithful starting logits to choose among (one per temperature or confidence, ``labels.py``) and
    what the experts said about the decoded images."""
    cfg, experts, device = run.cfg, run.experts, run.device
    y = syn.labels_hard().to(device)
    record: dict[str, Any] = {"init": cfg.label_init}
    base = None
    if cfg.label_init == "experts":
        with torch.no_grad():
            decoded = syn.decode()  # [n, C, H, W] training space: the labels belong to the decoded images
        finals = [experts.checkpoints(k, [experts.epochs])[0] for k in experts.indices]
        mean, hits = experts_mean_logits(run.model, run.layout, final_params=finals, x=decoded, y=y)
        base = raise_own_class(mean, y)
        # what DATM's formula alone would have started from: its agreement is what the raise repaired
        record.update(experts_correct=float((hits > 0).float().mean()),
                      experts_agreement=float((mean.argmax(1) == y).float().mean()))
    value = cfg.label_temperature if cfg.label_init == "experts" else cfg.label_confidence
    candidates = label_candidates(label_init=cfg.label_init, base=base, y=y, num_classes=run.data.num_classes, value=value)
    return candidates, record


def _label_knob(cfg: DistillConfig) -> str:
    return "label_temperature" if cfg.label_init == "experts" else "label_confidence"


def _pick_soft(run: _Run, state: DistillState, candidates: list[tuple[float, torch.Tensor]], *, score: bool) -> dict:
    """Set ``state.label_logits`` to the candidate scoring best on validation (the first on ties, or when
    ``score`` is false) and return the record: each candidate's score and label statistics, the choice, why."""
    knob, y = _label_knob(run.cfg), state.synthetic.labels_hard()
    rows = []
    for value, logits in candidates:
        state.label_logits = logits
        rows.append({knob: value, "val_acc": _validate(run, state) if score else None,
                     **label_stats(stored_labels(run.cfg, logits), y)})
    best = max(range(len(rows)), key=lambda i: rows[i]["val_acc"]) if score else 0  # max keeps the first of ties
    state.label_logits = candidates[best][1]
    value = candidates[best][0]
    if len(candidates) == 1:
        why = f"{knob}={value:g} was set"
    elif score:
        why = (f"{knob}={value:g} scored best on validation among "
               + ", ".join(f"{r[knob]:g}: {100 * r['val_acc']:.2f} %" for r in rows))
    else:
        why = f"{knob}={value:g}, the first candidate: no validation split to choose on"
    return {"knob": knob, "chosen": value, "candidates": rows, "val_acc": rows[best]["val_acc"], "why": why}


def _choose_labels(run: _Run, state: DistillState) -> dict:
    """The labels the run starts from, set on ``state``, and the record of why: soft labels at the best candidate
    temperature (or confidence), then, for labels=auto, soft or hard, whichever scores better on validation
    (soft on a tie). Validation uses ``validate``'s recipe, so the scores compare with the later ones."""
    cfg = run.cfg
    mode = cfg.label_mode
    y = state.synthetic.labels_hard()
    if mode == "hard":
        why = "soft_labels=false was set" if not cfg.soft_labels else "labels=hard was set"
        return {"requested": "hard", "mode": "hard", "why": why, "start": label_stats(y, y)}
    can_score = cfg.select_on == "val" and len(run.x_val) > 0
    candidates, record = _soft_candidates(run, state.synthetic)
    soft = _pick_soft(run, state, candidates, score=can_score and (len(candidates) > 1 or mode == "auto"))
    record.update(requested=mode, soft=soft)
    accs = {"soft": soft["val_acc"]}
    if mode == "auto" and can_score:
        logits, state.label_logits = state.label_logits, None
        accs["hard"] = _validate(run, state)
        state.label_logits = logits if accs["soft"] >= accs["hard"] else None
    chosen = "soft" if state.label_logits is not None else "hard"
    if mode == "auto" and can_score:
        why = (f"labels=auto: soft labels scored {100 * accs['soft']:.2f} % on validation, hard labels "
               f"{100 * accs['hard']:.2f} %: starting from {chosen} labels")
    elif mode == "auto":
        why = "labels=auto without a validation split to choose on (select_on=none or no validation images): soft labels"
    else:
        why = "labels=soft was set"
    if state.label_logits is not None:
        state.label_logits = state.label_logits.detach().clone().requires_grad_(True)
    start = stored_labels(cfg, state.label_logits) if chosen == "soft" else y
    record.update(mode=chosen, why=why, start=label_stats(start, y))
    if all(v is not None for v in accs.values()):
        record["val_acc"] = accs
    return record


def _start(run: _Run) -> tuple[DistillState, dict, bool]:
    """The resume point in ``run.out`` when there is one, else a fresh state; returns (state, info, resumed)."""
    resumed = load_checkpoint(run.out, cfg=run.cfg, device=run.device, experts=run.experts) if run.out is not None else None
    if resumed:
        return (*resumed, True)
    # the training images are only needed to initialise (whitening 45k CIFAR images takes ~30 s on a CPU)
    x_train = run.pre(run.data.x_train.to(run.device))  # [N, C, H, W] training space
    state, info = _fresh_state(run, x_train=x_train)
    del x_train
    info["labels"] = _choose_labels(run, state)  # soft or hard, temperature: on validation where asked
    state.optimizers = _optimizers(run.cfg, syn=state.synthetic, label_logits=state.label_logits, syn_lr=state.syn_lr)
    scored = info["labels"].get("val_acc", {}).get(info["labels"]["mode"])  # the chosen start's score, when measured
    if run.cfg.select_on == "val" and len(run.x_val) and (run.cfg.iterations > 0 or scored is not None):
        # the initialisation competes too: the selected set is never worse on validation than where it started
        info["init_val_acc"] = scored if scored is not None else _validate(run, state)
        state.best = {"iteration": 0, "val_acc": info["init_val_acc"], **_selectable(state)}
    return state, info, False


# full mode's graph per inner step, times this, is what its peak measured (0.32 GiB measured against 0.28 GiB
# of saved tensors per step of 100 CIFAR images, width 128: benchmarks/results/speed_cpu_*.json)
_ALLOCATOR_OVERHEAD = 1.2
# checkpoint mode holds one step's graph twice over while it replays it (the step and its double backward):
# 2.04 GiB peak RSS against 4.58 GiB for full mode's 10 steps of 100 images (benchmarks/results/speed_cpu_memory_*)
_CHECKPOINT_GRAPHS = 2.0
_GIB = 2**30


def default_batch_syn(cfg: DistillConfig, num_classes: int) -> tuple[int, str]:
    """b when batch_syn is unset: IPC x classes images, what one inner step over the pixel set of the same budget
    costs (the pixel set's whole set, as MTT uses), never the whole decoded low-rank set by accident."""
    b = cfg.ipc * num_classes
    return b, (f"batch_syn unset: {b} images per inner step (IPC {cfg.ipc} x {num_classes} classes), the cost of one "
               f"step over the pixel set of the same budget; --set batch_syn=N to change it")


def memory_estimate(run: _Run, state: DistillState) -> dict[str, float]:
    """Bytes the unroll will add at its peak in each memory mode (measured on one inner step of this run's batch
    size), and the real data the run keeps (already resident): {"full", "checkpoint", "tesla", "graph_per_step", "data"}."""
    cfg = run.cfg
    n = state.synthetic.num_images
    gen = iteration_generator(cfg.seed, -1)  # a probe of its own: no iteration's draws are used up
    steps = InnerSteps(model=run.model, layout=run.layout, decode=lambda idx: state.synthetic.decode(idx.to(run.device)),
                       label_loss=lambda logits, idx: logits.logsumexp(1).mean(),
                       batches=batch_schedule(n, min(cfg.batch_syn or n, n), 1, gen), dsa_config=run.dsa_config,
                       generator=gen, precision=run.precision)
    start = run.experts.checkpoints(run.experts.indices[0], [0])[0].to(run.device)
    per_step = graph_bytes_per_step(steps, start)
    data = sum(t.numel() * t.element_size() for t in (run.data.x_train, run.data.x_val, run.data.x_test, run.x_val)
               if t.device.type == torch.device(run.device).type)
    return {**unroll_bytes(per_step, syn_steps=cfg.syn_steps, theta_bytes=start.numel() * start.element_size()),
            "graph_per_step": float(per_step), "data": float(data)}


def unroll_bytes(graph_per_step: float, *, syn_steps: int, theta_bytes: int) -> dict[str, float]:
    """Peak bytes of the unroll per memory mode, from one inner step's graph: full mode keeps every step's,
    checkpoint mode two step graphs (while it replays one) plus the theta_n block [N, P]."""
    checkpoint = _ALLOCATOR_OVERHEAD * _CHECKPOINT_GRAPHS * graph_per_step + syn_steps * theta_bytes
    return {"full": _ALLOCATOR_OVERHEAD * syn_steps * graph_per_step, "checkpoint": checkpoint,
            "tesla": checkpoint}  # the same replay, less the Hessian-vector product: at most checkpoint's peak


def choose_precision(run: _Run, state: DistillState, *, started: str | None = None) -> tuple[str, str, dict]:
    """The student network's precision for this run, why, and what it was decided on: the configured one; for
    "auto" the one a resumed run ``started`` in, else bf16 on a CPU with native bf16 (``runtime.NATIVE_BF16_FLAGS``)
    where one inner step's forward costs at least ``AUTO_BF16_MIN_GFLOP``, and fp32 anywhere else."""
    cfg = run.cfg
    if cfg.precision != "auto":
        return cfg.precision, f"precision={cfg.precision} was set", {}
    on_cpu = torch.device(run.device).type == "cpu"
    # oneDNN runs bf16 natively; a torch build without it emulates bf16 even on such a CPU
    flag = native_bf16_flag() if on_cpu and torch.backends.mkldnn.is_available() else None
    if started is not None:
        slow = (" (this CPU has no native bf16: expect it many times slower than fp32; use another --out to start "
                "over in fp32)" if started == "bf16" and on_cpu and flag is None else "")
        return started, f"precision=auto: {started}, as this run started{slow}", {}
    if not on_cpu:
        return "fp32", (f"precision=auto chose fp32: bf16 has not been measured on {run.device} "
                        f"(--set precision=bf16 to use it)"), {}
    if flag is None:
        return "fp32", ("precision=auto chose fp32: this CPU has no native bf16 (no amx_bf16 or avx512_bf16 flag, or "
                        "a torch build without oneDNN), where bf16 ran 16x slower"), {}
    n, ranks = state.synthetic.num_images, world()[1]
    batch = -(-min(cfg.batch_syn or n, n) // ranks)  # this process's share of a step's batch (torchrun ranks)
    gflop = _forward_gflop(run.model, (batch, run.data.channels, *run.data.image_size))
    decided = {"native_bf16": flag, "step_forward_gflop": round(gflop, 4), "min_gflop": AUTO_BF16_MIN_GFLOP}
    step = f"one inner step's forward is {gflop:.3g} GFLOP ({batch} images{' per rank' if ranks > 1 else ''})"
    if gflop < AUTO_BF16_MIN_GFLOP:
        return "fp32", (f"precision=auto chose fp32: this CPU has native bf16 ({flag}), but {step}, under the "
                        f"{AUTO_BF16_MIN_GFLOP} GFLOP where bf16 starts to pay; --set precision=bf16 to use it anyway"), decided
    return "bf16", (f"precision=auto chose bf16: this CPU has native bf16 ({flag}) and {step}; "
                    f"--set precision=fp32 for fp32"), decided


def _forward_gflop(model: nn.Module, shape: tuple[int, ...]) -> float:
    """GFLOP of one forward pass of ``model`` on a batch of ``shape`` [b, C, H, W] (torch's FLOP counter), counted
    on a copy on the meta device: no arithmetic, no memory, and the model itself is left as it was."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.deepcopy(model).to("meta")(torch.zeros(shape, device="meta"))
    return counter.get_total_flops() / 1e9


def _started_precision(ckpt: dict, info: dict) -> str:
    """The precision a checkpointed run computed in: as its ``info`` (the checkpoint's init_info) records, else its
    configured one (checkpoints from before precision=auto ran what they configured, fp32 when they did not say)."""
    configured = ckpt["config"].get("precision", "fp32")
    return info.get("precision", {}).get("mode") or (configured if configured in PRECISIONS else "fp32")


def choose_memory(run: _Run, state: DistillState) -> tuple[str, str, dict]:
    """The memory mode for this run, why, and the estimate: the configured mode, or for "auto" full mode when its
    graph (measured on one inner step, times syn_steps) fits half of the memory still available, else checkpoint.
    Refuses (DistillError) a run whose mode cannot fit in the available memory, unless ``force``."""
    cfg = run.cfg
    est = memory_estimate(run, state)
    free = available_memory_bytes(run.device)
    if cfg.memory == "tesla":
        mode, why = "tesla", ("memory=tesla was set: APPROXIMATE gradients (TESLA's constant-memory rewrite drops the "
                              "later inner steps' Hessian terms; memory=checkpoint is exact at the same memory)")
    elif cfg.memory != "auto":
        mode, why = cfg.memory, f"memory={cfg.memory} was set"
    elif free is None:
        mode, why = "checkpoint", f"memory=auto: free memory unknown; full mode would keep ~{est['full'] / _GIB:.1f} GiB of graph"
    else:
        mode = "full" if est["full"] <= 0.5 * free else "checkpoint"
        why = (f"memory=auto chose {mode}: full mode would keep ~{est['full'] / _GIB:.1f} GiB of graph for {cfg.syn_steps} "
               f"inner steps, {free / _GIB:.1f} GiB available on {run.device}")
    estimate = {"peak_bytes": est[mode], "available_bytes": free, **est}
    if free is not None and est[mode] > free:
        msg = (f"this run does not fit: memory={mode} needs ~{est[mode] / _GIB:.2f} GiB for the unroll "
               f"(syn_steps={cfg.syn_steps}, batch_syn={min(cfg.batch_syn or state.synthetic.num_images, state.synthetic.num_images)}, "
               f"~{est['graph_per_step'] / _GIB:.3f} GiB of graph per inner step; real data kept: {est['data'] / _GIB:.2f} GiB) "
               f"and {free / _GIB:.2f} GiB is available on device {run.device}. Lower batch_syn or syn_steps, "
               f"{'use memory=checkpoint, ' if mode == 'full' else ''}another device, or --set force=true to start anyway")
        if not cfg.force:
            raise DistillError(msg)
        why += (f"; force=true: started although ~{est[mode] / _GIB:.2f} GiB may be needed and "
                f"{free / _GIB:.2f} GiB is available")
    return mode, why, estimate


# ---------------------------------------------------------------------------------------------------------
# one outer iteration


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def expert_for_iteration(indices: list[int], seed: int, iteration: int) -> int:
    """Cycle through the experts in a shuffled order, reshuffled every cycle (as MTT and DATM do)."""
    cycle, pos = divmod(iteration, len(indices))
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed * 7919 + cycle))
    return indices[int(perm[pos])]


def learnables_of(state: DistillState) -> list[torch.Tensor]:
    """The tensors the unroll differentiates into besides alpha: synthetic factors and label logits."""
    return [*state.synthetic.parameters(), *([state.label_logits] if state.label_logits is not None else [])]


def _unroll(cfg: DistillConfig, state: DistillState, *, model: nn.Module, layout: ParamLayout, start: torch.Tensor,
            device: str, dsa_config: DSAConfig | None, generator: torch.Generator, memory: str,
            precision: str) -> torch.Tensor:
    """theta_N [P]: a student trained from ``start`` [P] for syn_steps steps on synthetic batches."""
    syn = state.synthetic
    n = syn.num_images
    batches = batch_schedule(n, min(cfg.batch_syn or n, n), cfg.syn_steps, generator)
    hard = syn.labels_hard().to(device)
    pair_gen = generator if getattr(syn, "pairing", "fixed") == "random" else None

    def decode(idx):
        return syn.decode(idx.to(device), generator=pair_gen)

    def batch_loss(logits, idx):
        idx = idx.to(device)
        targets = hard[idx] if state.label_logits is None else soft_targets(state.label_logits[idx])
        return label_loss(logits, targets)

    return unroll_student(model, layout, start, decode=decode, label_loss=batch_loss, syn_lr=state.syn_lr,
                          batches=batches, dsa_config=dsa_config, generator=generator, memory=memory,
                          learnables=tuple(learnables_of(state)), precision=precision)


def _count_skip(cfg: DistillConfig, state: DistillState, record: dict[str, Any]) -> None:
    state.consecutive_skips += 1
    state.total_skips += 1
    record["skipped"] = True
    if state.consecutive_skips >= cfg.max_consecutive_skips:
        raise DistillError(
            f"{state.consecutive_skips} consecutive iterations had matching loss > threshold {cfg.threshold}: the "
            "students never got closer to the expert targets. Lower lr_img or lr_lr, lower max_start_epoch or "
            "syn_steps, or raise threshold"
        )


def _update(cfg: DistillConfig, state: DistillState, *, loss: torch.Tensor, record: dict[str, Any]) -> None:
    """Backpropagate the matching loss into the synthetic set, alpha and labels, and take one step of each."""
    i = state.iteration
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    reduce_partial_grads(learnables_of(state))  # under torchrun each rank holds its slice's part
    grads = [p.grad for opt in state.optimizers.values() for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not all(torch.isfinite(g).all() for g in grads):
        raise DistillError(f"non-finite gradient at iteration {i}; lower lr_img / lr_lr / syn_steps and start again with a new --out")
    record["lr_factor"] = _schedule_lrs(cfg, state)
    for opt in state.optimizers.values():
        opt.step()
    with torch.no_grad():  # alpha stays a positive step size (users saw it go negative or explode without this)
        state.syn_lr.clamp_(min=cfg.alpha_min, max=cfg.alpha_max)
    if not math.isfinite(state.syn_lr.item()):
        raise DistillError(f"the step size alpha became {state.syn_lr.item()} at iteration {i}; lower lr_lr and start again with a new --out")


def segment_loss(cfg: DistillConfig, state: DistillState, *, iteration: int, model, layout: ParamLayout,
                 experts: ExpertSet, device: str, dsa_config: DSAConfig | None,
                 memory: str = "full", precision: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Iteration ``iteration``'s matching loss L (0-dim, differentiable into the learnables) and its record: the
    expert segment it samples and the student unrolled on the current set. Every draw comes from the iteration's
    own generator, so the same iteration on the same state gives the same L. ``precision``: the resolved one
    (``choose_precision``); None: ``cfg.precision``, with "auto" read as fp32."""
    precision = precision or (cfg.precision if cfg.precision != "auto" else "fp32")
    gen = iteration_generator(cfg.seed, iteration)
    k = expert_for_iteration(experts.indices, cfg.seed, iteration)
    upper = start_epoch_upper(iteration, min_start_epoch=cfg.min_start_epoch,
                              current_max_start_epoch=cfg.current_max_start_epoch, max_start_epoch=cfg.max_start_epoch,
                              expansion_end_epoch=cfg.expansion_end_epoch, progressive=cfg.progressive)
    t = sample_start_epoch(upper, min_start_epoch=cfg.min_start_epoch, generator=gen)
    start, target = experts.checkpoints(k, [t, t + cfg.expert_epochs]).to(device)
    student = _unroll(cfg, state, model=model, layout=layout, start=start, device=device, dsa_config=dsa_config,
                      generator=gen, memory=memory, precision=precision)
    loss = trajectory_loss(student, start, target)
    return loss, {"iteration": iteration, "expert": k, "start_epoch": t, "max_start_epoch": upper,
                  "loss": float(loss.detach()), "syn_lr": state.syn_lr.item(), "skipped": False}


def outer_step(cfg: DistillConfig, state: DistillState, *, model, layout: ParamLayout, experts: ExpertSet,
               device: str, dsa_config: DSAConfig | None, memory: str = "full", precision: str | None = None,
               threshold: float | None = None) -> dict[str, Any]:
    """Sample an expert segment, unroll the student, and update the synthetic set, alpha and labels unless the
    loss exceeds ``threshold`` (the guard's tau; None: ``cfg.threshold``)."""
    i = state.iteration
    loss, record = segment_loss(cfg, state, iteration=i, model=model, layout=layout, experts=experts, device=device,
                                dsa_config=dsa_config, memory=memory, precision=precision)
    if not math.isfinite(record["loss"]):
        raise DistillError(
            f"matching loss became {record['loss']} at iteration {i} (expert {record['expert']}, start epoch "
            f"{record['start_epoch']}); lower lr_img, lr_lr or syn_steps, or lower max_start_epoch, and start again "
            "with a new --out"
        )
    if loss.item() > (cfg.threshold if threshold is None else threshold):  # decided before the backward pass:
        _count_skip(cfg, state, record)                                      # a skipped update costs no backward
        return record
    state.consecutive_skips = 0
    _update(cfg, state, loss=loss, record=record)
    update_ema(state.ema, state.synthetic)  # applied updates only: a skipped iteration leaves the average as it is
    return record


# Seen on CIFAR-10 with experts trained for one epoch (benchmarks/cifar10.py --expert-epochs 1, 2026-12-01): every
# segment's loss was 1.4-1.6 > threshold 1 from the first iteration on, so the guard skipped all 150 updates
# (alpha's too, the one knob that could have brought the loss under 1) and the "distilled" set was its
# initialisation. With the guard off the same run beat its hard-label start on test (37.67 against 36.54 %,
# benchmarks/results/cifar10_cpu_experts1ep_threshold_2026-12-01.md). On the benchmark's usual experts the first
# segments score 0.4-1.0, so the probe leaves the guard on there.
def settle_guard(run: _Run, state: DistillState) -> dict[str, Any]:
    """The update guard's record for a fresh run: the losses of its first ``threshold_probe`` segments on the
    initial set (forward only), and whether the guard is lifted because every one of them exceeds threshold."""
    cfg = run.cfg
    probe = range(state.iteration, state.iteration + min(cfg.threshold_probe, cfg.iterations - state.iteration))
    if len(probe) == 0:
        knob = "threshold_probe=0" if cfg.threshold_probe == 0 else "no iteration left to probe"
        return {"threshold": cfg.threshold, "lifted": False, "probe_losses": [],
                "why": f"updates whose loss exceeds threshold={cfg.threshold:g} are skipped (not probed: {knob})"}
    with torch.no_grad():  # checkpoint mode's forward keeps no graph: the probe costs a forward unroll per segment
        losses = [segment_loss(cfg, state, iteration=i, model=run.model, layout=run.layout, experts=run.experts,
                               device=run.device, dsa_config=run.dsa_config, memory="checkpoint",
                               precision=run.precision)[1]["loss"]
                  for i in probe]
    shown = ", ".join(f"{v:.3g}" for v in losses)
    # a non-finite loss never lifts it (its iteration stops the run), and is recorded as None: JSON has no inf/nan
    lifted = all(math.isfinite(v) and v > cfg.threshold for v in losses)
    why = (f"the first {len(losses)} segments' matching losses on the initial set ({shown}) all exceed "
           f"threshold={cfg.threshold:g}, so the guard would skip every update and the set would never move: no "
           f"update is skipped in this run (to keep the guard, start again with a new --out and threshold_probe=0)"
           if lifted else f"the first {len(losses)} segments' matching losses on the initial set ({shown}); updates "
           f"whose loss exceeds threshold={cfg.threshold:g} are skipped")
    return {"threshold": cfg.threshold, "lifted": lifted, "why": why,
            "probe_losses": [v if math.isfinite(v) else None for v in losses]}


def _timed_step(run: _Run, state: DistillState) -> dict[str, Any]:
    """One outer iteration; advances ``state.iteration`` and returns the iteration's record."""
    t0 = time.time()
    record = outer_step(run.cfg, state, model=run.model, layout=run.layout, experts=run.experts, device=run.device,
                        dsa_config=run.dsa_config, memory=run.memory, precision=run.precision,
                        threshold=run.threshold)
    state.iteration += 1
    record["seconds"] = round(time.time() - t0, 4)
    return record


# ---------------------------------------------------------------------------------------------------------
# validation, checkpoints, artifact


def evaluated_set(state: DistillState) -> SyntheticSet:
    """The set that validation scores, selection keeps and the artifact holds: the EMA with ema_decay, else the set
    being optimised. Both decode to [n, C, H, W] in the training space and share the labels and alpha."""
    return averaged_set(state.ema) if state.ema is not None else state.synthetic


def stored_labels(cfg: DistillConfig, logits: torch.Tensor) -> torch.Tensor:
    """The label logits [n, classes] as the artifact will hold them (``label_dtype``, ``label_topk``): what validation
    trains on and what the label statistics describe, so the selected set is scored as it will be used. The
    learnable logits themselves stay float32 during the optimisation: rounded every step, SGD's small updates to
    them would vanish, and top-k would cut the gradient to the other classes."""
    return compact_labels(logits.detach(), dtype=cfg.label_dtype, topk=cfg.label_topk)


def targets_of(cfg: DistillConfig, state: DistillState) -> torch.Tensor:
    """Evaluation targets: softmax of the label logits as stored [n, classes], or hard labels [n]."""
    if state.label_logits is not None:
        return soft_targets(stored_labels(cfg, state.label_logits))
    return state.synthetic.labels_hard()


def validate(cfg, state, *, model_spec, data, x_val, device) -> float:
    """Validation accuracy of networks trained on ``evaluated_set(state)`` (the EMA with ema_decay, else the current
    set) with the current labels and alpha; never the test split."""
    recipe = EvalRecipe(name="distill-val", epochs=cfg.eval_epochs, batch_size=cfg.eval_batch_size,
                        dsa=cfg.dsa, dsa_strategy=cfg.dsa_strategy, epoch_mode=cfg.eval_epoch_mode)
    synthetic = evaluated_set(state)
    with torch.no_grad():
        images = synthetic.decode().detach()  # [n, C, H, W] training space
    try:
        res = evaluate_synthetic(images=images, targets=targets_of(cfg, state), x_test=x_val, y_test=data.y_val,
                                 model_spec=model_spec, num_classes=data.num_classes, lr=state.syn_lr.item(),
                                 recipe=recipe, runs=cfg.eval_runs, seed=cfg.seed, device=device, ipc=cfg.ipc,
                                 eval_split="val", synthetic=synthetic)
    except RuntimeError as exc:  # a diverging validation network: the learned step size is the usual culprit
        raise DistillError(f"validation training diverged at step size alpha={state.syn_lr.item():.4g} ({exc}); "
                           "lower lr_teacher or lr_lr and start again with a new --out") from exc
    return float(res["mean"])


def _validate(run: _Run, state: DistillState) -> float:
    return validate(run.cfg, state, model_spec=run.experts.model, data=run.data, x_val=run.x_val, device=run.device)


def _validate_if_due(run: _Run, state: DistillState, record: dict[str, Any]) -> None:
    """At every eval_every-th and at the last iteration: record val_acc and keep the best set so far, and how
    well the labels carry the class (label_agreement, label_max_prob, label_own_prob: ``labels.label_stats``)."""
    cfg = run.cfg
    due = state.iteration == cfg.iterations or (cfg.eval_every and state.iteration % cfg.eval_every == 0)
    if due and state.label_logits is not None:  # hard labels carry the class by construction
        stats = label_stats(stored_labels(cfg, state.label_logits), state.synthetic.labels_hard())
        record.update(label_agreement=stats["agreement"], label_max_prob=stats["mean_max_prob"],
                      label_own_prob=stats["mean_own_prob"])
    if cfg.select_on == "val" and len(run.x_val) and due:
        record["val_acc"] = _validate(run, state)
        if record["val_acc"] > state.best.get("val_acc", -1.0):
            state.best = {"iteration": state.iteration, "val_acc": record["val_acc"], **_selectable(state)}


def _snapshot(state: DistillState, syn: SyntheticSet | None = None) -> dict[str, Any]:
    """CPU copies of a set's state dict (``syn``; by default the set being optimised, what a checkpoint resumes
    from), of the label logits [n, classes] (or None) and of alpha."""
    syn = state.synthetic if syn is None else syn
    return {
        "synthetic": {k: v.detach().cpu().clone() for k, v in syn.state_dict().items()},
        "labels": None if state.label_logits is None else state.label_logits.detach().cpu().clone(),
        "lr": state.syn_lr.item(),
    }


def _selectable(state: DistillState) -> dict[str, Any]:
    """The snapshot that selection keeps and the artifact holds: ``evaluated_set`` (the EMA with ema_decay)."""
    return _snapshot(state, evaluated_set(state))


def save_checkpoint(out: Path, *, cfg: DistillConfig, state: DistillState, description: dict, info: dict,
                    experts: ExpertSet) -> None:
    atomic_torch_save(out / CHECKPOINT, {
        "iteration": state.iteration,
        "config": cfg.to_dict(),
        "description": json.dumps(description),
        "init_info": json.dumps(info),
        "state": _snapshot(state),
        "ema": None if state.ema is None else ema_state(state.ema),
        "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
        "consecutive_skips": state.consecutive_skips,
        "total_skips": state.total_skips,
        "best": state.best,
        "experts": json.dumps(_experts_identity(experts)),
    })


def _experts_identity(experts: ExpertSet) -> dict:
    """What the iteration -> expert mapping depends on: a resume must see the same experts."""
    return {"identity": experts.manifest.get("identity"), "indices": experts.indices}


def _stored_config(ckpt: dict, cfg: DistillConfig) -> dict[str, Any]:
    """The checkpoint's config with the knobs added since it was written filled in (see ``_START_ONLY``)."""
    stored = dict(ckpt["config"])
    later = {k: v for k, v in cfg.to_dict().items() if k in _START_ONLY and k not in stored}
    if stored.get("batch_syn") is None:  # written before batch_syn had a default: it meant the whole set
        stored["batch_syn"] = json.loads(ckpt["description"]).get("num_images")
    return {**DistillConfig().to_dict(), **later, **stored}


def _check_resumable(out: Path, ckpt: dict, *, cfg: DistillConfig, experts: ExpertSet, started: str) -> None:
    """Refuse (DistillError) a resume whose settings or experts differ from the checkpoint's; ``started``: the
    precision the run computed in (``_started_precision``)."""
    stored = _stored_config(ckpt, cfg)
    # precision is compared apart: "auto" resumes in whatever the run started in, on any machine
    old = {k: v for k, v in stored.items() if k not in _RESUMABLE_CHANGES | {"precision"}}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE_CHANGES | {"precision"}}
    if cfg.precision not in ("auto", started):
        raise DistillError(f"{out} holds a run distilled in precision={started}; a resume cannot change it: repeat "
                           f"precision={started} (or precision=auto), or use another --out")
    if (old_mode := stored.get("memory")) != cfg.memory and "tesla" in (old_mode, cfg.memory):
        raise DistillError(f"{out} holds a run with memory={old_mode}; memory=tesla (approximate gradients) cannot be "
                           "switched on or off on resume: repeat the original memory setting, or use another --out")
    if old != new:
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        raise DistillError(f"{out} holds a run with other settings {diff} (stored, requested); use another --out, "
                           "or repeat the original command to resume it")
    if json.loads(ckpt.get("experts", "null")) != _experts_identity(experts):
        raise DistillError(f"{out} was distilled from other experts (or another set of finished experts); resume it "
                           f"with the original --experts folder, or use another --out")


def load_checkpoint(out: Path, *, cfg: DistillConfig, device: str, experts: ExpertSet) -> tuple[DistillState, dict] | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # written atomically, so only a file changed by someone else gets here
        # the exception's own text is left out: torch's advice there (weights_only=False) would run the file's code
        raise DistillError(f"{path} is damaged or not a checkpoint ({type(exc).__name__}); delete it "
                           f"to start the run in {out} over, or use another --out") from exc
    info = json.loads(ckpt["init_info"])
    started = _started_precision(ckpt, info)
    _check_resumable(out, ckpt, cfg=cfg, experts=experts, started=started)
    syn = build_synthetic_set(json.loads(ckpt["description"]))
    syn.load_state_dict(ckpt["state"]["synthetic"])
    syn = syn.to(device)
    labels = ckpt["state"]["labels"]
    label_logits = None if labels is None else labels.to(device).requires_grad_(True)
    syn_lr = torch.tensor(ckpt["state"]["lr"], device=device, requires_grad=True)
    state = DistillState(iteration=ckpt["iteration"], synthetic=syn, label_logits=label_logits, syn_lr=syn_lr,
                         optimizers=_optimizers(cfg, syn=syn, label_logits=label_logits, syn_lr=syn_lr),
                         consecutive_skips=ckpt["consecutive_skips"], total_skips=ckpt["total_skips"], best=ckpt["best"],
                         ema=new_ema(syn, cfg.ema_decay))
    if state.ema is not None:  # ema_decay is compared with the stored config, so a checkpoint with it holds an "ema"
        state.ema.load_state_dict(ckpt["ema"])
    for k, opt in state.optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][k])
    info.setdefault("precision", {"mode": started, "why": "as configured (written before precision=auto)"})
    return state, info


def _truncate_log(path: Path, iteration: int) -> list[dict]:
    """Keep the log records before ``iteration`` (a resumed run rewrites the rest)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill mid-write: that iteration is redone anyway
            continue
    records = [r for r in records if r.get("iteration", -1) < iteration]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _save_if_due(run: _Run, state: DistillState, *, stop_at: int, description: dict, info: dict,
                 stopping: bool = False) -> Path | None:
    """Grids every grid_every iterations; the resume checkpoint every checkpoint_every, where this call stops, and
    when ``stopping`` (Ctrl-C was pressed: the iteration just finished is kept). Returns the grid drawn now, if one was."""
    cfg = run.cfg
    if run.out is None or not run.is_main:
        return None
    grid = None
    if cfg.grid_every and state.iteration % cfg.grid_every == 0:
        grid = run.out / "grids" / f"iter_{state.iteration:06d}.png"
        _save_grid(grid, syn=state.synthetic, pre=run.pre, data=run.data)
    if state.iteration % cfg.checkpoint_every == 0 or state.iteration == stop_at or stopping:
        save_checkpoint(run.out, cfg=cfg, state=state, description=description, info=info, experts=run.experts)
    return grid if grid is not None and grid.exists() else None


def _say_resumed(run: _Run, state: DistillState) -> None:
    """One line on stderr, on a terminal or not: what a rerun kept and where it goes on from."""
    cfg, best = run.cfg, state.best.get("iteration")
    if state.iteration >= cfg.iterations:
        print(f"distill: {run.out} has finished all {cfg.iterations} iterations (checkpoint at iteration "
              f"{state.iteration}); nothing to train", file=sys.stderr)
        return
    kept = f"; best on validation so far: iteration {best}" if best is not None else ""
    ema = ", its EMA" if state.ema is not None else ""
    print(f"distill: resuming {run.out} from its checkpoint at iteration {state.iteration} (synthetic set{ema}, labels, "
          f"step size and optimiser state kept{kept}); continuing to iteration {cfg.iterations}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# the loop


def distill(config: DistillConfig, *, experts: str | Path | ExpertSet, out: str | Path | None = None,
            data: RealData | None = None, progress: bool = True, argv: list[str] | None = None) -> DistillResult:
    """Distill a synthetic set from ``experts``; with ``out``, checkpoint there, resume from it, and write
    ``out/synthetic.safetensors`` (the artifact), ``out/log.jsonl``, grids and curves."""
    run, chosen = _setup(config, experts=experts, out=out, data=data)
    state, info, resumed = _start(run)
    info.update(chosen)
    precision, precision_why, decided = choose_precision(
        run, state, started=info.get("precision", {}).get("mode") if resumed else None)
    info["precision"] = {"mode": precision, "why": precision_why, **decided} if not resumed else info["precision"]
    run = replace(run, precision=precision)
    memory, why, estimate = choose_memory(run, state)
    info["memory"] = {"mode": memory, "exact": memory in EXACT_MEMORY_MODES, "why": why, "estimate": estimate}
    info["allocator"] = allocator_status()  # this process's (a resumed run may differ from its start)
    run = replace(run, memory=memory)
    if not resumed:
        info["guard"] = settle_guard(run, state)
    guard = info.get("guard", {})  # a checkpoint written before the probe existed: the guard was on
    run = replace(run, threshold=math.inf if guard.get("lifted") else run.cfg.threshold)
    cfg, out = run.cfg, run.out if run.is_main else None  # under torchrun rank 0 alone writes
    if progress and run.is_main:
        if "batch_syn" in info:
            print(info["batch_syn"]["why"], file=sys.stderr)
        print(why, file=sys.stderr)
        print(precision_why, file=sys.stderr)
        print(describe_allocator(info["allocator"]), file=sys.stderr)
        if "why" in guard:
            print(f"update guard {'lifted' if guard.get('lifted') else 'on'}"
                  f"{' (decided at the start)' if resumed else ''}: {guard['why']}", file=sys.stderr)
    description = state.synthetic.describe()
    history = _truncate_log(out / LOG, state.iteration) if out is not None else []
    sinks = open_sinks(cfg, out=out, log=out / LOG if out is not None else None, progress=progress and run.is_main,
                       initial=state.iteration, main=run.is_main)
    if out is not None and not resumed:
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, cfg=cfg, state=state, description=description, info=info, experts=run.experts)

    if resumed and progress and run.is_main:
        _say_resumed(run, state)

    stop_at = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, state.iteration + cfg.stop_after)
    first_iteration = state.iteration
    # Ctrl-C finishes the iteration, checkpoints it and stops (one process: ranks could stop at different iterations)
    stop = StopRequest(message="distill: Ctrl-C: finishing this iteration, then checkpointing (Ctrl-C again stops "
                               "at once, losing it)", enabled=world()[1] == 1)
    try:
        with stop:
            while state.iteration < stop_at:
                record = _timed_step(run, state)          # one outer iteration; state.iteration moves on by one
                _validate_if_due(run, state, record)      # adds val_acc and keeps the best set, when due
                history.append(record)
                sinks.write(record)                       # log.jsonl, progress bar, TensorBoard, wandb
                grid = _save_if_due(run, state, stop_at=stop_at, description=description, info=info,
                                    stopping=stop.requested)
                if grid is not None:
                    sinks.picture("grid", grid, state.iteration)
                if stop.requested:
                    raise KeyboardInterrupt
    finally:
        sinks.close()
    if run.is_main:
        _warn_if_stalled(run.cfg, history[first_iteration:])
    return _finish(run, state, description=description, info=info, history=history,
                   ran=state.iteration > first_iteration, argv=argv)


def _select(cfg: DistillConfig, state: DistillState) -> tuple[dict, dict]:
    """The manifest's selection record and the snapshot it names (the EMA's, with ema_decay: then the record says so)."""
    averaged = {"set": "ema", "ema_decay": cfg.ema_decay} if state.ema is not None else {}
    if cfg.select_on == "val" and state.best:
        return {"select_on": "val", "iteration": state.best["iteration"], "score": state.best["val_acc"],
                "metric": "validation accuracy", **averaged}, state.best
    last = {"select_on": "none", "iteration": state.iteration, "score": None, "metric": None, **averaged}
    return last, _selectable(state)


# Seen on CIFAR-10 with experts trained for one epoch (benchmarks/cifar10.py --expert-epochs 1, 2026-12-01): the
# student ended farther from epoch 1 than it started in all 150 iterations (loss 1.45-1.6 > threshold 1), so the
# guard skipped every update and the "distilled" set was its initialisation. Say so instead of ending quietly.
_STALL_AFTER = 20  # iterations, all skipped, before the run says that nothing was learned


def _warn_if_stalled(cfg: DistillConfig, records: list[dict]) -> None:
    if len(records) >= _STALL_AFTER and all(r.get("skipped") for r in records):
        low = min(r["loss"] for r in records)
        print(f"distill: warning: all {len(records)} updates were skipped because the matching loss (lowest "
              f"{low:.3g}) exceeded threshold={cfg.threshold:g}: the student ends farther from the target checkpoint "
              f"than it starts, so the set did not change; lower lr_teacher or syn_steps, match a later segment "
              f"(min_start_epoch), or raise threshold", file=sys.stderr)


def _finish(run: _Run, state: DistillState, *, description: dict, info: dict, history: list[dict], ran: bool,
            argv: list[str] | None) -> DistillResult:
    """The selected set; once all iterations are done, its artifact (and the final pictures) in ``run.out``."""
    cfg, out = run.cfg, run.out
    selection, final = _select(cfg, state)
    syn = build_synthetic_set(description)
    syn.load_state_dict(final["synthetic"])
    learned = final["labels"]  # [n, classes] full-precision logits, or None for hard labels
    labels = syn.labels_hard() if learned is None else stored_labels(cfg, learned)  # as the artifact holds them
    artifact = None
    finished = out is not None and run.is_main and state.iteration == cfg.iterations
    if finished and not ran and (out / ARTIFACT).exists():
        artifact = out / ARTIFACT  # a finished run rerun: keep its artifact (and the results recorded in it)
    elif finished:
        artifact = _write_artifact(run, syn=syn, labels=labels if learned is None else learned, lr=final["lr"],
                                   selection=selection, info=info, argv=argv)
        _save_grid(out / "final_grid.png", syn=syn, pre=run.pre, data=run.data)
        _plot_curves(out)
    return DistillResult(out=out, artifact=artifact, synthetic=syn, labels=labels, syn_lr=float(final["lr"]),
                         selection=selection, history=history, init_info=info)


def _write_artifact(run: _Run, *, syn: SyntheticSet, labels: torch.Tensor, lr: float, selection: dict, info: dict,
                    argv: list[str] | None) -> Path:
    """``labels``: the learned logits [n, classes] at full precision (stored per label_dtype and label_topk, which
    gives exactly ``stored_labels``), or hard labels [n]."""
    experts = run.experts
    experts_ref = {"path": str(experts.folder.resolve()), "num_experts": len(experts.indices), "epochs": experts.epochs,
                   "identity": experts.manifest.get("identity")}
    return save_artifact(run.out / ARTIFACT, synthetic=syn, labels=labels, lr=lr, preprocessor=run.pre.to("cpu"),
                         dataset=dataset_record(run.data, data_root=experts.dataset.get("data_root")), ipc=run.cfg.ipc,
                         model=experts.model, experts=experts_ref, selection=selection, config=run.cfg.to_dict(),
                         extra={"init": info, "argv": argv if argv is not None else sys.argv},
                         label_dtype=run.cfg.label_dtype, label_topk=run.cfg.label_topk)


def _save_grid(path: Path, *, syn: SyntheticSet, pre: Preprocessor, data: RealData) -> None:
    try:
        # imported here for its measured cost: viz pulls in matplotlib (~0.4 s), paid only when a picture is drawn
        from mttlss.viz import save_grid

        with torch.no_grad():
            images = pre.to("cpu").inverse(syn.decode().cpu())  # pictures are drawn on the CPU
        save_grid(images, syn.labels_hard(), data.class_names, path)
    except Exception as exc:
        print(f"warning: could not draw the image grid: {exc}", file=sys.stderr)


def _plot_curves(out: Path) -> None:
    try:
        from mttlss.viz import plot_curves  # here for its measured cost (matplotlib, ~0.4 s), as in _save_grid

        if (out / LOG).exists():  # iterations=0 (the initialisation itself) has no log
            plot_curves(out / LOG, out / "curves.png")
    except Exception as exc:  # a picture must never cost the user the run
        print(f"warning: could not draw the curves: {exc}", file=sys.stderr)
