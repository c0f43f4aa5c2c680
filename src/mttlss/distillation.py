"""The distillation loop: optimise a synthetic set so that students trained on it follow the experts.

Read top to bottom: ``distill()`` sets up (experts, data, synthetic set, labels, optimisers), then runs
``outer_step()`` per iteration, evaluates on the validation split now and then, checkpoints atomically, and
finally writes the artifact of the synthetic set selected on the validation split.

Every iteration's randomness (which expert, start epoch, minibatches, DSA) comes from a generator seeded by
(seed, iteration), so a resumed run repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mttlss.augment import DSAConfig
from mttlss.config import DistillConfig
from mttlss.data import Preprocessor, RealData, load_dataset
from mttlss.distributed import default_device
from mttlss.experts import ExpertSet
from mttlss.io_utils import atomic_torch_save, atomic_write_text
from mttlss.labels import correct_candidates, init_soft_labels
from mttlss.matching import (
    ParamLayout,
    batch_schedule,
    sample_start_epoch,
    soft_label_loss,
    start_epoch_upper,
    trajectory_loss,
    unroll_student,
)
from mttlss.models import build_model, has_buffers
from mttlss.parameterization import LowRankSet, PixelSet, SyntheticSet, build_synthetic_set, solve_budget

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
ARTIFACT = "synthetic.safetensors"
# knobs to settle before resuming a run: everything that changes what an iteration computes
_RESUMABLE_CHANGES = {"iterations", "stop_after", "device", "tensorboard", "checkpoint_every", "grid_every"}


class DistillError(RuntimeError):
    """The run cannot go on; the message names the knobs to change."""


@dataclass
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


@dataclass
class DistillResult:
    out: Path | None
    artifact: Path | None
    synthetic: SyntheticSet
    labels: torch.Tensor                # logits [n, classes] or hard [n]
    syn_lr: float
    selection: dict
    history: list[dict]
    init_info: dict = field(default_factory=dict)   # budget, reconstruction error, initial validation accuracy


# ---------------------------------------------------------------------------------------------------------
# set-up


def _load_real(experts: ExpertSet, data: RealData | None) -> RealData:
    if data is not None:
        return data
    ds, split = experts.dataset, experts.dataset["split"]
    return load_dataset(ds["name"], data_root=ds.get("data_root"), val_fraction=split["val_fraction"],
                        val_max=split["val_max"], split_seed=split["seed"])


def _check_segments(cfg: DistillConfig, experts: ExpertSet) -> None:
    need = cfg.max_start_epoch - 1 + cfg.expert_epochs
    if need > experts.epochs:
        raise DistillError(
            f"max_start_epoch - 1 + expert_epochs = {need} exceeds the {experts.epochs} epochs stored per expert; "
            f"lower max_start_epoch / expert_epochs or train experts with --epochs {need}"
        )


def _budget(cfg: DistillConfig, data: RealData):
    return solve_budget(
        num_classes=data.num_classes, image_shape=(data.channels, *data.image_size), ipc=cfg.ipc, param=cfg.param,
        rank=cfg.rank, code=cfg.code, subspaces=cfg.subspaces, num_subspaces=cfg.num_subspaces,
        share_channels=cfg.share_channels, count_labels=cfg.count_labels and cfg.soft_labels,
        max_images_per_class=cfg.max_images_per_class,
    )


def init_synthetic(cfg, data, x_train, model, layout, experts, device) -> tuple[SyntheticSet, dict]:
    """Build the synthetic set from real training images (training space), per ``cfg.init``."""
    budget = _budget(cfg, data)
    gen = torch.Generator().manual_seed(cfg.seed)
    candidates = None
    if cfg.init == "correct":
        candidates = _correct_candidates(experts, model, layout, x_train, data, budget.images_per_class, device)
    x_cpu, y_cpu = x_train.cpu(), data.y_train.cpu()
    shape = (data.channels, *data.image_size)
    info: dict[str, Any] = {"budget": budget.as_dict()}
    if cfg.param == "pixel":
        syn = PixelSet.from_real(x_cpu, y_cpu, num_classes=data.num_classes, images_per_class=budget.images_per_class,
                                 generator=gen, candidates=candidates)
    else:
        syn, rec = LowRankSet.from_real(
            x_cpu, y_cpu, num_classes=data.num_classes, images_per_class=budget.images_per_class, rank=cfg.rank,
            code=cfg.code, subspaces=cfg.subspaces, num_subspaces=cfg.num_subspaces, share_channels=cfg.share_channels,
            pairing=cfg.pairing, generator=gen, candidates=candidates,
        )
        info.update(rec)
    if cfg.init == "noise":
        with torch.no_grad():
            for p in syn.parameters():
                p.normal_(generator=gen)
    assert syn.image_shape == shape
    return syn.to(device), info


def _correct_candidates(experts, model, layout, x_train, data, needed: int, device) -> list[torch.Tensor]:
    """Per class, real images an expert's final checkpoint classifies correctly (DATM); when a class has fewer
    than ``needed``, the next expert's correct images are added (the parameterisation tops up the rest)."""
    y = data.y_train.to(device)
    pooled: list[torch.Tensor] | None = None
    for k in experts.indices:
        final = experts.checkpoints(k, [experts.epochs])[0]
        found = correct_candidates(model, layout, final, x_train, y, data.num_classes)
        pooled = found if pooled is None else [torch.unique(torch.cat([a, b])) for a, b in zip(pooled, found)]
        if all(len(c) >= needed for c in pooled):
            break
    return pooled


def _optimizers(cfg: DistillConfig, syn: SyntheticSet, label_logits, syn_lr) -> dict[str, torch.optim.Optimizer]:
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


def _fresh_state(cfg, data, x_train, model, layout, experts, device) -> tuple[DistillState, dict]:
    syn, info = init_synthetic(cfg, data, x_train, model, layout, experts, device)
    label_logits = None
    if cfg.soft_labels:
        with torch.no_grad():
            decoded = syn.decode()
        finals = [experts.checkpoints(k, [experts.epochs])[0] for k in experts.indices]
        label_logits = init_soft_labels(model, layout, finals, decoded, syn.labels_hard().to(device))
        label_logits = label_logits.detach().clone().requires_grad_(True)
        info["label_init_agreement"] = float((label_logits.argmax(1).cpu() == syn.labels_hard()).float().mean())
    syn_lr = torch.tensor(cfg.lr_teacher, device=device, requires_grad=True)
    return DistillState(0, syn, label_logits, syn_lr, _optimizers(cfg, syn, label_logits, syn_lr)), info


# ---------------------------------------------------------------------------------------------------------
# one outer iteration


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def expert_for_iteration(indices: list[int], seed: int, iteration: int) -> int:
    """Cycle through the experts in a shuffled order, reshuffled every cycle (as MTT and DATM do)."""
    cycle, pos = divmod(iteration, len(indices))
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed * 7919 + cycle))
    return indices[int(perm[pos])]


def outer_step(cfg: DistillConfig, state: DistillState, *, model, layout: ParamLayout, experts: ExpertSet,
               device: str, dsa_config: DSAConfig | None) -> dict[str, Any]:
    """Sample an expert segment, unroll the student, and update the synthetic set, alpha and labels."""
    i = state.iteration
    gen = iteration_generator(cfg.seed, i)
    k = expert_for_iteration(experts.indices, cfg.seed, i)
    upper = start_epoch_upper(i, min_start_epoch=cfg.min_start_epoch, current_max_start_epoch=cfg.current_max_start_epoch,
                              max_start_epoch=cfg.max_start_epoch, expansion_end_epoch=cfg.expansion_end_epoch,
                              progressive=cfg.progressive)
    t = sample_start_epoch(upper, min_start_epoch=cfg.min_start_epoch, generator=gen)
    start, target = experts.checkpoints(k, [t, t + cfg.expert_epochs]).to(device)
    syn = state.synthetic
    n = syn.num_images
    batches = batch_schedule(n, min(cfg.batch_syn or n, n), cfg.syn_steps, gen)
    hard = syn.labels_hard().to(device)
    pair_gen = gen if getattr(syn, "pairing", "fixed") == "random" else None

    def decode(idx):
        return syn.decode(idx.to(device), generator=pair_gen)

    def label_loss(logits, idx):
        if state.label_logits is not None:
            return soft_label_loss(logits, state.label_logits[idx.to(device)])
        return F.cross_entropy(logits, hard[idx.to(device)])

    student = unroll_student(model, layout, start, decode=decode, label_loss=label_loss, syn_lr=state.syn_lr,
                             batches=batches, dsa_config=dsa_config, generator=gen)
    loss = trajectory_loss(student, start, target)
    record = {"iteration": i, "expert": k, "start_epoch": t, "max_start_epoch": upper, "loss": float(loss.detach()),
              "syn_lr": state.syn_lr.item(), "skipped": False}
    if not math.isfinite(record["loss"]):
        raise DistillError(
            f"matching loss became {record['loss']} at iteration {i} (expert {k}, start epoch {t}); lower lr_img, "
            "lr_lr or syn_steps, or lower max_start_epoch, and start again with a new --out"
        )
    if loss.item() > cfg.threshold:  # decided before the backward pass: a skipped update costs no backward
        state.consecutive_skips += 1
        state.total_skips += 1
        record["skipped"] = True
        if state.consecutive_skips >= cfg.max_consecutive_skips:
            raise DistillError(
                f"{state.consecutive_skips} consecutive iterations had matching loss > threshold {cfg.threshold}: the "
                "students never got closer to the expert targets. Lower lr_img or lr_lr, lower max_start_epoch or "
                "syn_steps, or raise threshold"
            )
        return record
    state.consecutive_skips = 0
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
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
    return record


# ---------------------------------------------------------------------------------------------------------
# validation, checkpoints, artifact


def targets_of(state: DistillState) -> torch.Tensor:
    """Evaluation targets: softmax of the label logits [n, classes], or hard labels [n]."""
    if state.label_logits is not None:
        return F.softmax(state.label_logits.detach(), dim=1)
    return state.synthetic.labels_hard()


def validate(cfg, state, *, model_spec, data, x_val, device) -> float:
    """Validation accuracy of networks trained on the current synthetic set (never the test split)."""
    from mttlss.evaluate import EvalRecipe, evaluate_synthetic

    recipe = EvalRecipe(name="distill-val", epochs=cfg.eval_epochs, batch_size=cfg.eval_batch_size,
                        dsa=cfg.dsa, dsa_strategy=cfg.dsa_strategy, epoch_mode=cfg.eval_epoch_mode)
    with torch.no_grad():
        images = state.synthetic.decode().detach()
    try:
        res = evaluate_synthetic(images=images, targets=targets_of(state), x_test=x_val, y_test=data.y_val,
                                 model_spec=model_spec, num_classes=data.num_classes, lr=state.syn_lr.item(),
                                 recipe=recipe, runs=cfg.eval_runs, seed=cfg.seed, device=device, ipc=cfg.ipc,
                                 eval_split="val")
    except RuntimeError as exc:  # a diverging validation network: the learned step size is the usual culprit
        raise DistillError(f"validation training diverged at step size alpha={state.syn_lr.item():.4g} ({exc}); "
                           "lower lr_teacher or lr_lr and start again with a new --out") from exc
    return float(res["mean"])


def _snapshot(state: DistillState) -> dict[str, Any]:
    return {
        "synthetic": {k: v.detach().cpu().clone() for k, v in state.synthetic.state_dict().items()},
        "labels": None if state.label_logits is None else state.label_logits.detach().cpu().clone(),
        "lr": state.syn_lr.item(),
    }


def save_checkpoint(out: Path, cfg: DistillConfig, state: DistillState, description: dict, info: dict,
                    experts: ExpertSet) -> None:
    atomic_torch_save(out / CHECKPOINT, {
        "iteration": state.iteration,
        "config": cfg.to_dict(),
        "description": json.dumps(description),
        "init_info": json.dumps(info),
        "state": _snapshot(state),
        "optimizers": {k: o.state_dict() for k, o in state.optimizers.items()},
        "consecutive_skips": state.consecutive_skips,
        "total_skips": state.total_skips,
        "best": state.best,
        "experts": json.dumps(_experts_identity(experts)),
    })


def _experts_identity(experts: ExpertSet) -> dict:
    """What the iteration -> expert mapping depends on: a resume must see the same experts."""
    return {"identity": experts.manifest.get("identity"), "indices": experts.indices}


def load_checkpoint(out: Path, cfg: DistillConfig, device: str, experts: ExpertSet) -> tuple[DistillState, dict] | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    old = {k: v for k, v in ckpt["config"].items() if k not in _RESUMABLE_CHANGES}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE_CHANGES}
    if old != new:
        diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
        raise DistillError(f"{out} holds a run with other settings {diff} (stored, requested); use another --out, "
                           "or repeat the original command to resume it")
    if json.loads(ckpt.get("experts", "null")) != _experts_identity(experts):
        raise DistillError(f"{out} was distilled from other experts (or another set of finished experts); resume it "
                           f"with the original --experts folder, or use another --out")
    syn = build_synthetic_set(json.loads(ckpt["description"]))
    syn.load_state_dict(ckpt["state"]["synthetic"])
    syn = syn.to(device)
    labels = ckpt["state"]["labels"]
    label_logits = None if labels is None else labels.to(device).requires_grad_(True)
    syn_lr = torch.tensor(ckpt["state"]["lr"], device=device, requires_grad=True)
    state = DistillState(ckpt["iteration"], syn, label_logits, syn_lr, _optimizers(cfg, syn, label_logits, syn_lr),
                         ckpt["consecutive_skips"], ckpt["total_skips"], ckpt["best"])
    for k, opt in state.optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][k])
    return state, json.loads(ckpt["init_info"])


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


# ---------------------------------------------------------------------------------------------------------
# the loop


def distill(config: DistillConfig, *, experts: str | Path | ExpertSet, out: str | Path | None = None,
            data: RealData | None = None, progress: bool = True, argv: list[str] | None = None) -> DistillResult:
    """Distill a synthetic set from ``experts``; with ``out``, checkpoint there, resume from it, and write
    ``out/synthetic.safetensors`` (the artifact), ``out/log.jsonl``, grids and curves."""
    cfg = config.validate()
    experts = experts if isinstance(experts, ExpertSet) else ExpertSet(experts)
    _check_segments(cfg, experts)
    device = default_device(cfg.device)
    data = _load_real(experts, data)
    pre: Preprocessor = experts.preprocessor().to(device)
    model = build_model(experts.model, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size).to(device)
    layout = experts.check_model(model)
    if has_buffers(model):
        raise DistillError(f"model {experts.model['name']} has buffers (BatchNorm); trajectory matching needs a buffer-free "
                           "network such as convnet with instancenorm")
    x_val = pre(data.x_val.to(device))  # [N_val, C, H, W] training space
    dsa_config = DSAConfig(strategy=cfg.dsa_strategy) if cfg.dsa else None
    out = Path(out) if out is not None else None

    resumed = load_checkpoint(out, cfg, device, experts) if out is not None else None
    if resumed:
        state, info = resumed
    else:  # the training images are only needed to initialise (whitening 45k CIFAR images takes ~30 s on a CPU)
        x_train = pre(data.x_train.to(device))  # [N, C, H, W] training space
        state, info = _fresh_state(cfg, data, x_train, model, layout, experts, device)
        del x_train
        if cfg.select_on == "val" and len(x_val) and cfg.iterations > 0:
            # the initialisation competes too: the selected set is never worse on validation than where it started
            info["init_val_acc"] = validate(cfg, state, model_spec=experts.model, data=data, x_val=x_val, device=device)
            state.best = {"iteration": 0, "val_acc": info["init_val_acc"], **_snapshot(state)}
    description = state.synthetic.describe()
    history = _truncate_log(out / LOG, state.iteration) if out is not None else []
    writer = _tensorboard(cfg, out)
    if out is not None and not resumed:
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, cfg, state, description, info, experts)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.iterations, initial=state.iteration, desc="distill", disable=None)
    stop_at = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, state.iteration + cfg.stop_after)
    model_spec = experts.model
    first_iteration = state.iteration
    while state.iteration < stop_at:
        t0 = time.time()
        record = outer_step(cfg, state, model=model, layout=layout, experts=experts, device=device, dsa_config=dsa_config)
        state.iteration += 1
        record["seconds"] = round(time.time() - t0, 4)
        done = state.iteration == cfg.iterations
        if cfg.select_on == "val" and len(x_val) and (done or (cfg.eval_every and state.iteration % cfg.eval_every == 0)):
            record["val_acc"] = validate(cfg, state, model_spec=model_spec, data=data, x_val=x_val, device=device)
            if record["val_acc"] > state.best.get("val_acc", -1.0):
                state.best = {"iteration": state.iteration, "val_acc": record["val_acc"], **_snapshot(state)}
        history.append(record)
        if out is not None:
            with open(out / LOG, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if cfg.grid_every and state.iteration % cfg.grid_every == 0:
                _save_grid(out / "grids" / f"iter_{state.iteration:06d}.png", state, pre, data)
            if state.iteration % cfg.checkpoint_every == 0 or state.iteration == stop_at:
                save_checkpoint(out, cfg, state, description, info, experts)
        if writer is not None:
            for key in ("loss", "syn_lr", "max_start_epoch", "val_acc"):
                if key in record:
                    writer.add_scalar(key, record[key], state.iteration)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['syn_lr']:.4f}", U=record["max_start_epoch"])
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()

    selection, final = _select(cfg, state)
    syn = build_synthetic_set(description)
    syn.load_state_dict(final["synthetic"])
    labels = final["labels"] if final["labels"] is not None else syn.labels_hard()
    artifact = None
    ran = state.iteration > first_iteration
    if out is not None and state.iteration == cfg.iterations and not ran and (out / ARTIFACT).exists():
        artifact = out / ARTIFACT  # a finished run rerun: keep its artifact (and the results recorded in it)
    elif out is not None and state.iteration == cfg.iterations:
        artifact = _write_artifact(out, cfg, syn, labels, final["lr"], pre, data, experts, selection, info, argv)
        _save_grid(out / "final_grid.png", None, pre, data, syn=syn)
        try:
            from mttlss.viz import plot_curves

            if (out / LOG).exists():  # iterations=0 (the initialisation itself) has no log
                plot_curves(out / LOG, out / "curves.png")
        except Exception as exc:  # a picture must never cost the user the run
            print(f"warning: could not draw the curves: {exc}", file=sys.stderr)
    return DistillResult(out, artifact, syn, labels, float(final["lr"]), selection, history, info)


def _select(cfg: DistillConfig, state: DistillState) -> tuple[dict, dict]:
    if cfg.select_on == "val" and state.best:
        return {"select_on": "val", "iteration": state.best["iteration"], "score": state.best["val_acc"],
                "metric": "validation accuracy"}, state.best
    return {"select_on": "none", "iteration": state.iteration, "score": None, "metric": None}, _snapshot(state)


def _write_artifact(out, cfg, syn, labels, lr, pre, data, experts, selection, info, argv) -> Path:
    from mttlss.artifact import save_artifact

    dataset = {"name": data.name, "class_names": list(data.class_names), "num_classes": data.num_classes,
               "image_shape": [data.channels, *data.image_size], "split": data.split,
               "data_root": experts.dataset.get("data_root")}
    experts_ref = {"path": str(experts.folder.resolve()), "num_experts": len(experts.indices), "epochs": experts.epochs,
                   "identity": experts.manifest.get("identity")}
    return save_artifact(out / ARTIFACT, synthetic=syn, labels=labels, lr=lr, preprocessor=pre.to("cpu"), dataset=dataset,
                         ipc=cfg.ipc, model=experts.model, experts=experts_ref, selection=selection, config=cfg.to_dict(),
                         extra={"init": info, "argv": argv if argv is not None else sys.argv})


def _save_grid(path: Path, state: DistillState | None, pre: Preprocessor, data: RealData, syn: SyntheticSet | None = None) -> None:
    try:
        from mttlss.viz import save_grid

        syn = syn if syn is not None else state.synthetic
        with torch.no_grad():
            images = pre.to("cpu").inverse(syn.decode().cpu())  # pictures are drawn on the CPU
        save_grid(images, syn.labels_hard(), data.class_names, path)
    except Exception as exc:
        print(f"warning: could not draw the image grid: {exc}", file=sys.stderr)


def _tensorboard(cfg: DistillConfig, out: Path | None):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise DistillError("tensorboard=true needs the extra: pip install 'mttlss[tensorboard]'") from exc
    return SummaryWriter(log_dir=str((out or Path("runs")) / "tensorboard"))
