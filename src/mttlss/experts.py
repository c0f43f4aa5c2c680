"""Expert trajectories: networks trained on the real data, their parameters stored after every epoch.

Layout of an experts folder::

    experts/
      manifest.json              what these experts are: dataset, split, preprocessing, model spec and
                                 parameter layout, optimiser, augmentation, epochs, seeds, versions
      preprocess.safetensors     the fitted preprocessing state (mean/std or ZCA matrices)
      expert_000.safetensors     "trajectory" [E+1, P] float32 (row e = parameters after epoch e; row 0 =
                                 initialisation), "train_loss" [E], "val_acc" [E]

Each expert file is written atomically once the expert is finished, so rerunning the same command after an
interruption (even kill -9) keeps the finished experts and trains only the missing ones. Expert k is seeded
with ``seed + k`` whatever the number of workers or ranks, so a parallel run gives the same experts.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from mttlss import __version__
from mttlss.augment import DSAConfig
from mttlss.data import RealData, canonical_name, dataset_record, load_dataset
from mttlss.distributed import DistInfo, barrier, init_distributed, map_in_processes, shard
from mttlss.errors import UserError
from mttlss.gsam import GSAM
from mttlss.io_utils import atomic_save_safetensors, atomic_write_json
from mttlss.models import ParamLayout, build_model, flatten_params, model_spec
from mttlss.preprocessing import NORMALIZATION, Preprocessor
from mttlss.schema import Nullable, check_record, require
from mttlss.training import evaluate_accuracy, train_one_epoch

FORMAT = "mttlss-experts"
FORMAT_VERSION = 1


class ExpertError(UserError, RuntimeError):
    """Experts that are missing, damaged, or do not match what the caller asked for."""


_FIX = "the manifest does not fit these experts: retrain them into a new folder (mttlss experts --out NEW)"
DATASET_SCHEMA = {"name": str, "class_names": Nullable(list), "num_classes": int, "image_shape": list,
                  "split": Nullable(dict), "data_root": Nullable(str)}
MANIFEST_SCHEMA = {"format": str, "format_version": int, "identity": Nullable(dict), "dataset": DATASET_SCHEMA,
                   "preprocessing": {"kind": str}, "model": {"name": str}, "parameter_layout": list, "num_params": int,
                   "epochs": int}


def _check_layout(m: dict, *, file: Path) -> None:
    """The parameter layout: [name, shape] pairs adding up to num_params, a classifier with one output per class."""
    layout = m["parameter_layout"]
    ok = all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], list)
             and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in e[1]) for e in layout)
    require(ok, file=file, field="parameter_layout", problem="expected a list of [name, shape] pairs", fix=_FIX)
    total = sum(math.prod(shape) for _, shape in layout)
    require(total == m["num_params"], file=file, field="num_params",
            problem=f"says {m['num_params']} but parameter_layout adds up to {total}", fix=_FIX)
    outputs = {shape[0] for name, shape in layout if name.startswith("classifier.")}
    classes = m["dataset"]["num_classes"]
    require(not outputs or outputs == {classes}, file=file, field="dataset.num_classes",
            problem=f"says {classes} classes but the experts' classifier has {sorted(outputs)} outputs", fix=_FIX)


def read_manifest(folder: str | Path) -> dict:
    """An experts folder's manifest, checked against its schema (types, lengths, class count against the
    network's outputs); every message names the file and the field."""
    file = Path(folder) / "manifest.json"
    try:
        m = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ExpertError(f"{file} is damaged ({exc}); retrain the experts into a new folder") from exc
    check_record(m, {"format": str}, file=file, fix="it is not an mttlss experts manifest; point to an experts folder")
    if m["format"] != FORMAT:
        raise ExpertError(f"{file} is not an mttlss experts manifest (format {m['format']!r}); point to an experts folder")
    check_record(m, MANIFEST_SCHEMA, file=file, fix=_FIX)
    ds = m["dataset"]
    names, shape = ds.get("class_names"), ds["image_shape"]
    require(names is None or len(names) == ds["num_classes"], file=file, field="dataset.class_names",
            problem=f"{len(names or [])} names for {ds['num_classes']} classes", fix=_FIX)
    require(len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape), file=file, field="dataset.image_shape",
            problem=f"{shape} is not [channels, height, width]", fix=_FIX)
    require(m["epochs"] >= 0, file=file, field="epochs", problem=f"{m['epochs']} is negative", fix=_FIX)
    _check_layout(m, file=file)
    return m


@dataclass
class ExpertConfig:
    dataset: str = "cifar10"
    data_root: str | None = None
    model: dict = field(default_factory=lambda: model_spec("convnet"))
    num_experts: int = 10
    epochs: int = 50                # E: checkpoints 0..E are stored; needs E >= T+ - 1 + M for distillation
    lr: float = 0.01                # the field's expert recipe: plain SGD at 0.01, constant
    momentum: float = 0.0
    weight_decay: float = 0.0
    # "sgd" (MTT) | "gsam": GSAM steps around that SGD, FTD's and DATM's flatter experts (method.md section 4;
    # rho 0.01, alpha 0.3: FTD's CIFAR-10 IPC 1/10 value and DATM's; FTD uses 1 for CIFAR-10 IPC 50 and CIFAR-100)
    optimizer: str = "sgd"
    gsam_rho: float = 0.01          # constant, as in FTD's expert script
    gsam_alpha: float = 0.3
    batch_size: int = 256
    preprocess: str = "normalize"   # "normalize" | "zca"
    zca_eps: float = 0.1
    # normalize: a named convention (preprocessing.CONVENTIONS: "cifar10", ..., "computed") or explicit constants
    # (the user's, e.g. for a folder: dataset); None: the dataset's published row if it has one, else computed
    normalization: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fit_on: str = "train"           # what ZCA / computed statistics are fitted on: "train" (minus validation, our
                                    # rule) | "full-train" (the reference's, for imported experts)
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    seed: int = 0                   # expert k uses seed + k
    val_fraction: float = 0.1
    val_max: int = 5000
    split_seed: int = 0
    # fast path (an option: measure its effect on expert accuracy before relying on it)
    channels_last: bool = False
    bf16: bool = False              # bf16 autocast for forward/backward; stored parameters stay float32
    compile: bool = False           # torch.compile the network
    device: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ExpertError(f"optimizer={self.optimizer!r} is not one of {', '.join(map(repr, OPTIMIZERS))}; "
                              "pass --optimizer sgd or --optimizer gsam")
        for name in ("gsam_rho", "gsam_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ExpertError(f"{name}={value!r} must be a finite number >= 0; pass e.g. "
                                  f"--{name.replace('_', '-')} {getattr(ExpertConfig, name)}")

    def identity(self) -> dict[str, Any]:
        """The settings that define the experts (a rerun must agree on these to resume)."""
        d = asdict(self)
        for k in ("num_experts", "data_root", "device"):
            d.pop(k)
        if d["optimizer"] == "sgd":  # GSAM's settings do not apply to SGD experts
            d.pop("gsam_rho")
            d.pop("gsam_alpha")
        # settings added later are part of the identity only when set, so folders written before them still resume
        for k, default in _LATER_DEFAULTS.items():
            if d[k] == default:
                d.pop(k)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = [float(v) for v in d[k]]
        return d


_LATER_DEFAULTS = {"normalization": None, "mean": None, "std": None, "fit_on": "train", "optimizer": "sgd"}
OPTIMIZERS = ("sgd", "gsam")


# ---------------------------------------------------------------------------------------------------------
# training one expert


def _data_and_preprocessor(cfg: ExpertConfig, out: Path | None) -> tuple[RealData, Preprocessor]:
    data = load_dataset(
        cfg.dataset, data_root=cfg.data_root, val_fraction=cfg.val_fraction, val_max=cfg.val_max, split_seed=cfg.split_seed
    )
    state_file = out / "preprocess.safetensors" if out is not None else None
    if state_file is not None and state_file.exists():
        return data, _read_preprocessor(out, read_manifest(out)["preprocessing"])
    return data, fit_preprocessor(cfg, data)


def fit_preprocessor(cfg: ExpertConfig, data: RealData) -> Preprocessor:
    """The experts' preprocessing, fitted on train minus validation (so the validation split stays unseen by
    experts and by the ZCA fit), or with ``fit_on="full-train"`` on the whole training split as the reference does."""
    x, fitted_on = data.x_train, "train-minus-val"
    if cfg.fit_on == "full-train" or not len(data.x_val):
        x = torch.cat([data.x_train, data.x_val]) if len(data.x_val) else data.x_train  # [N_train, C, H, W], pixel space
        fitted_on = "full-train"
    elif cfg.fit_on != "train":
        raise ValueError(f"fit_on={cfg.fit_on!r} is not one of 'train', 'full-train'")
    return Preprocessor.fit(cfg.preprocess, x, dataset=cfg.dataset, eps=cfg.zca_eps, fitted_on=fitted_on,
                            normalization=cfg.normalization, mean=cfg.mean, std=cfg.std)


def _read_preprocessor(folder: Path, meta: dict) -> Preprocessor:
    """The fitted preprocessing state of an experts folder (``preprocess.safetensors``)."""
    path = Path(folder) / "preprocess.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return Preprocessor.from_state(meta, tensors)
    except Exception as exc:  # missing, damaged (safetensors' own error types), or not the manifest's kind
        raise ExpertError(f"{path} is missing or damaged ({type(exc).__name__}: {exc}); the experts cannot be used "
                          "without it: retrain them into a new folder") from exc


def train_expert(index: int, cfg: ExpertConfig, *, data: RealData, pre: Preprocessor, device: str,
                 progress: bool = False) -> dict:
    """Train expert ``index``; returns {"trajectory" [E+1, P], "train_loss" [E], "val_acc" [E], ...}."""
    seed = cfg.seed + index
    torch.manual_seed(seed)  # network initialisation
    gen = torch.Generator().manual_seed(seed)  # shuffling and DSA
    model = build_model(cfg.model, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile else model
    opt = _optimizer(cfg, model)
    pre = pre.to(device)
    x_train, y_train = pre(data.x_train.to(device)), data.y_train.to(device)  # training space
    x_val, y_val = pre(data.x_val.to(device)), data.y_val.to(device)
    dsa_config = DSAConfig(strategy=cfg.dsa_strategy) if cfg.dsa else None
    trajectory = [flatten_params(model).cpu()]
    losses, val_accs = [], []
    epochs = tqdm(range(cfg.epochs), desc=f"expert {index}", leave=False) if progress else range(cfg.epochs)
    for _ in epochs:
        loss = train_one_epoch(
            net, opt, x=x_train, targets=y_train, batch_size=cfg.batch_size, dsa_config=dsa_config, generator=gen,
            bf16=cfg.bf16, channels_last=cfg.channels_last,
        )
        if not math.isfinite(loss):
            raise ExpertError(f"expert {index}: training loss became {loss}; lower --lr or check the data")
        losses.append(loss)
        val_accs.append(evaluate_accuracy(net, x_val, y_val) if len(x_val) else float("nan"))
        trajectory.append(flatten_params(model).cpu())
    return {
        "trajectory": torch.stack(trajectory),
        "train_loss": torch.tensor(losses, dtype=torch.float32),
        "val_acc": torch.tensor(val_accs, dtype=torch.float32),
        "seed": seed,
    }


def _optimizer(cfg: ExpertConfig, model: torch.nn.Module) -> torch.optim.Optimizer | GSAM:
    """The experts' SGD (constant lr), or GSAM steps around it."""
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return sgd
    return GSAM(base=sgd, rho=cfg.gsam_rho, alpha=cfg.gsam_alpha, buffers=model.buffers())


def optimizer_record(cfg: ExpertConfig) -> dict[str, Any]:
    """The manifest's ``optimizer``: SGD's settings, and GSAM's around them."""
    sgd = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
           "schedule": "constant"}
    if cfg.optimizer == "sgd":
        return {"name": "sgd", **sgd}
    return {"name": "gsam", "base": "sgd", **sgd, "rho": cfg.gsam_rho, "rho_schedule": "constant", "alpha": cfg.gsam_alpha}


def expert_path(out: Path, index: int) -> Path:
    return Path(out) / f"expert_{index:03d}.safetensors"


def _save_expert(out: Path, index: int, result: dict, *, extra: dict | None = None) -> None:
    meta = {
        "index": index,
        "seed": result["seed"],
        "epochs": int(result["trajectory"].shape[0] - 1),
        "num_params": int(result["trajectory"].shape[1]),
        "final_val_acc": float(result["val_acc"][-1]) if len(result["val_acc"]) else None,
        "final_train_loss": float(result["train_loss"][-1]) if len(result["train_loss"]) else None,
        **(extra or {}),
    }
    tensors = {k: result[k] for k in ("trajectory", "train_loss", "val_acc")}
    atomic_save_safetensors(expert_path(out, index), tensors, metadata={"mttlss_expert": json.dumps(meta)})


# ---------------------------------------------------------------------------------------------------------
# the experts folder


def _manifest(cfg: ExpertConfig, *, data: RealData, pre: Preprocessor, layout: ParamLayout) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": cfg.identity(),
        "dataset": dataset_record(data, data_root=cfg.data_root),
        "preprocessing": pre.meta(),
        "model": cfg.model,
        "parameter_layout": layout.as_list(),
        "num_params": layout.num_params,
        "optimizer": optimizer_record(cfg),
        "augmentation": {"dsa": cfg.dsa, "strategy": cfg.dsa_strategy if cfg.dsa else None},
        "epochs": cfg.epochs,
        "seeds": f"expert k uses seed {cfg.seed} + k",
        "storage": "expert_<k>.safetensors: trajectory [epochs+1, num_params] float32 (row 0 = initialisation), "
                   "train_loss [epochs], val_acc [epochs]",
        "versions": {"mttlss": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def _optimizer_flags(identity: dict) -> str:
    """The command-line flags that ask for the optimiser an identity records (SGD when it records none)."""
    if identity.get("optimizer", "sgd") == "sgd":
        return "--optimizer sgd"
    return f"--optimizer gsam --gsam-rho {identity.get('gsam_rho')} --gsam-alpha {identity.get('gsam_alpha')}"


def _check_same_experts(cfg: ExpertConfig, out: Path, *, stored: dict) -> None:
    """Refuse to add experts to ``out`` that another optimiser or other settings would train."""
    requested = cfg.identity()
    if _optimizer_flags(stored) != _optimizer_flags(requested):
        raise ExpertError(
            f"{out} holds experts trained with {_optimizer_flags(stored)}, not {_optimizer_flags(requested)}; "
            "resume it with those flags, or train these experts into another --out folder"
        )
    if stored != requested:
        diff = {k: (stored.get(k), requested.get(k)) for k in sorted({*stored, *requested}) if stored.get(k) != requested.get(k)}
        raise ExpertError(
            f"{out} already holds experts trained with other settings {diff} (stored, requested); "
            "use another --out folder, or repeat the original command to resume it"
        )


def _prepare_folder(cfg: ExpertConfig, out: Path) -> tuple[RealData, Preprocessor, ParamLayout]:
    """Load data, fit or restore preprocessing, write manifest + preprocessing state (once)."""
    manifest_file = out / "manifest.json"
    if manifest_file.exists():
        _check_same_experts(cfg, out, stored=read_manifest(out).get("identity") or {})
    data, pre = _data_and_preprocessor(cfg, out if manifest_file.exists() else None)
    model = build_model(cfg.model, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size)
    layout = ParamLayout.of(model)
    if not manifest_file.exists():
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(out / "preprocess.safetensors", pre.state_dict())
        atomic_write_json(manifest_file, _manifest(cfg, data=data, pre=pre, layout=layout))
    return data, pre, layout


def _train_and_save(args: tuple[int, ExpertConfig, str, str]) -> int:
    """Worker entry (module level so process pools can pickle it): each process loads its own data copy."""
    index, cfg, out, device = args
    data, pre = _data_and_preprocessor(cfg, Path(out))
    _save_expert(Path(out), index, train_expert(index, cfg, data=data, pre=pre, device=device))
    return index


def finished_experts(out: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in Path(out).glob("expert_[0-9][0-9][0-9].safetensors"))


def _say_resumed(out: Path, *, done: list[int], missing: list[int]) -> None:
    """One line on stderr, on a terminal or not: which experts a rerun kept and which it trains."""
    rest = f"training the {len(missing)} missing ({', '.join(map(str, missing[:8]))}{', ...' if len(missing) > 8 else ''})"
    print(f"experts: resuming {out}: kept {len(done)} finished experts; "
          f"{rest if missing else 'none missing, nothing to train'}", file=sys.stderr)


def train_experts(cfg: ExpertConfig, out: str | Path, *, workers: int = 1, progress: bool = True) -> "ExpertSet":
    """Train the missing experts of ``out`` (resumable), in ``workers`` processes or torchrun ranks."""
    out = Path(out)
    info: DistInfo = init_distributed(cfg.device)
    if info.is_main:
        data, pre, _ = _prepare_folder(cfg, out)
    barrier(info)
    if not info.is_main:
        data, pre = _data_and_preprocessor(cfg, out)
    done = set(finished_experts(out))
    todo = shard([k for k in range(cfg.num_experts) if k not in done], info)
    if done and progress and info.is_main:
        _say_resumed(out, done=sorted(done), missing=[k for k in range(cfg.num_experts) if k not in done])
    if workers > 1 and todo:
        map_in_processes(_train_and_save, [(k, cfg, str(out), info.device) for k in todo], workers=workers)
    else:
        show = progress and info.is_main
        bar = tqdm(total=len(todo), desc="experts", disable=None) if show else None  # disable=None: quiet off a terminal
        for k in todo:
            t0 = time.time()
            result = train_expert(k, cfg, data=data, pre=pre, device=info.device,
                                  progress=show and bar is not None and not bar.disable)
            _save_expert(out, k, result)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(val_acc=f"{float(result['val_acc'][-1]):.3f}", sec=f"{time.time() - t0:.0f}")
        if bar is not None:
            bar.close()
    barrier(info)
    return ExpertSet(out)


# ---------------------------------------------------------------------------------------------------------
# reading


class ExpertSet:
    """A folder of experts: its manifest, the preprocessing state and lazy access to trajectories."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_file = self.folder / "manifest.json"
        if self.folder.is_file():
            raise ExpertError(
                f"{self.folder} is a file, but --experts takes the folder that `mttlss experts --out DIR` wrote "
                "(an artifact .safetensors goes to `mttlss evaluate`, `mttlss info` or `mttlss export`)"
            )
        if not manifest_file.exists():
            raise ExpertError(
                f"no experts at {self.folder} (manifest.json missing); train them with "
                f"`mttlss experts --dataset NAME --out {self.folder}` or convert reference buffers with `mttlss experts import`"
            )
        self.manifest = read_manifest(self.folder)
        self.indices = finished_experts(self.folder)
        if not self.indices:
            raise ExpertError(f"{self.folder} has a manifest but no finished expert files; rerun `mttlss experts` to train them")

    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def num_params(self) -> int:
        return int(self.manifest["num_params"])

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def dataset(self) -> dict:
        return self.manifest["dataset"]

    def preprocessor(self) -> Preprocessor:
        return _read_preprocessor(self.folder, self.manifest["preprocessing"])

    def check_model(self, model: torch.nn.Module) -> ParamLayout:
        """Fail loudly when ``model`` is not the network these experts were trained with."""
        layout = ParamLayout.of(model)
        stored = [[n, list(s)] for n, s in self.manifest["parameter_layout"]]
        if layout.as_list() != stored:
            raise ExpertError(
                f"the network ({layout.num_params} parameters) does not match the experts in {self.folder} "
                f"({self.num_params} parameters, model {self.model}); use the experts' model spec or train new experts"
            )
        return layout

    def _open(self, index: int):
        path = expert_path(self.folder, index)
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise ExpertError(f"expert file {path} is damaged or unreadable ({exc}); delete it and rerun `mttlss experts` to retrain it") from exc

    def checkpoints(self, index: int, epochs: list[int]) -> torch.Tensor:
        """Rows of expert ``index``'s trajectory ([len(epochs), P]) without reading the whole file."""
        with self._open(index) as f:
            sl = f.get_slice("trajectory")
            rows, cols = sl.get_shape()
            if cols != self.num_params or rows != self.epochs + 1:
                raise ExpertError(
                    f"{expert_path(self.folder, index)} holds a trajectory of shape {[rows, cols]} but "
                    f"{self.folder / 'manifest.json'} says {[self.epochs + 1, self.num_params]} ({self.epochs} epochs of "
                    f"model {self.model}): the file and the manifest come from different runs (another width, depth or "
                    "--epochs); keep each experts folder's files together, or delete the file and rerun the original "
                    "`mttlss experts` command to retrain it")
            return torch.stack([sl[e] for e in epochs])

    def trajectory(self, index: int) -> torch.Tensor:
        return self.checkpoints(index, list(range(self.epochs + 1)))

    def metrics(self, index: int) -> dict[str, Any]:
        with self._open(index) as f:
            meta = json.loads(f.metadata()["mttlss_expert"])
            meta["train_loss"] = f.get_tensor("train_loss").tolist()
            meta["val_acc"] = f.get_tensor("val_acc").tolist()
        return meta

    def validity(self) -> list[dict[str, Any]]:
        """Per expert: final validation accuracy and whether the training loss kept decreasing (the
        maintainers' first debugging step when distillation fails). Imported experts have no training record:
        their rows carry ``imported`` (where from) and ``check`` (accuracy at the first and last stored epoch)."""
        report = []
        for k in self.indices:
            m = self.metrics(k)
            loss = m["train_loss"]
            decreasing = len(loss) < 2 or loss[-1] < loss[0]
            report.append({"index": k, "final_val_acc": m["final_val_acc"], "final_train_loss": m["final_train_loss"],
                           "loss_decreased": decreasing, "imported": m.get("imported"), "check": m.get("check")})
        return report

    def report_lines(self) -> list[str]:
        """One line per expert, as ``mttlss experts`` / ``experts import`` / ``info`` print it."""
        chance = 1.0 / max(1, int(self.dataset.get("num_classes") or 1))
        lines = []
        for r in self.validity():
            if r["imported"] is None:
                flag = "" if r["loss_decreased"] else "  <- training loss did not decrease"
                lines.append(f"expert {r['index']:3d}: final val acc {r['final_val_acc']:.4f}  "
                             f"train loss {r['final_train_loss']:.4f}{flag}")
                continue
            line = f"expert {r['index']:3d}: imported from {r['imported']['from']}, no training record"
            check = r["check"]
            if check:
                accs = ", ".join(f"epoch {e} {100 * a:.2f} %" for e, a in zip(check["epochs"], check["acc"]))
                line += f"; {check['split']} accuracy ({check['images']} images): {accs}"
                if check["acc"][-1] < 1.5 * chance:
                    line += "  <- near chance: check the preprocessing (--zca, --normalization) and --model"
            lines.append(line)
        return lines


# ---------------------------------------------------------------------------------------------------------
# import of reference-format buffers


def _require_convention(cfg: ExpertConfig) -> None:
    """Reference experts were trained on a preprocessing the buffer does not record: never guess it from the copy."""
    if cfg.preprocess != "normalize" or cfg.normalization is not None or cfg.mean is not None:
        return
    name = canonical_name(cfg.dataset)
    if name in NORMALIZATION:
        return
    raise ExpertError(
        f"dataset {cfg.dataset!r} has no known normalisation convention, and the reference buffers do not record "
        f"the one they were trained with. Say it: --normalization NAME (the field's constants of "
        f"{', '.join(NORMALIZATION)}; e.g. cifar10 for an npz copy of CIFAR-10), --mean M1,M2,M3 --std S1,S2,S3, "
        f"--zca for ZCA-whitened experts, or --normalization computed to compute mean/std from this copy"
    )


def _read_buffers(paths: list[str | Path]) -> list[tuple[str, list[list[torch.Tensor]]]]:
    """(file name, expert) pairs from reference ``replay_buffer_<n>.pt`` files, in sorted file order."""
    experts = []
    for p in sorted(map(Path, paths)):
        if not p.exists():
            raise ExpertError(f"no buffer file at {p}")
        try:
            buf = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExpertError(f"{p} could not be read as a reference replay buffer ({exc})") from exc
        if not isinstance(buf, list):
            raise ExpertError(f"{p} holds a {type(buf).__name__}, expected a list of experts")
        experts.extend((f"{p.name}[{j}]", expert) for j, expert in enumerate(buf))
    if not experts:
        raise ExpertError("the buffer files hold no experts")
    return experts


def _held_out(data: RealData, pre: Preprocessor, *, max_images: int, device: str) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The split an imported expert is checked on: validation when there is one, else test; at most ``max_images``
    of it (a seeded random subset: npz files are often sorted by class). Images in training space."""
    split, x, y = ("val", data.x_val, data.y_val) if len(data.x_val) else ("test", data.x_test, data.y_test)
    if len(y) > max_images:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:max_images].sort().values
        x, y = x[idx], y[idx]
    return split, pre.to(device)(x.to(device)), y.to(device)


def stored_epoch_accuracy(model: torch.nn.Module, rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy of ``model`` with each parameter row of ``rows`` [k, P] loaded, on ``x`` (training space) / ``y``."""
    device = next(model.parameters()).device
    accs = []
    for row in rows:
        torch.nn.utils.vector_to_parameters(row.to(device), model.parameters())
        accs.append(evaluate_accuracy(model, x, y))
    return accs


def import_reference(paths: list[str | Path], out: str | Path, *, cfg: ExpertConfig, check_images: int = 5000) -> ExpertSet:
    """Convert reference ``replay_buffer_<n>.pt`` files (a list of experts, each a list of per-epoch parameter
    lists in ``named_parameters`` order) into an experts folder. ``cfg`` describes how they were trained
    (dataset, model, preprocessing): the reference format does not say, so the caller must; ZCA is fitted on the
    full training split, as the reference does. Each expert's accuracy at its first and last stored epoch on the
    held-out split (``check_images`` of it at most; 0: no check) is recorded in its file (``ExpertSet.validity``)."""
    out = Path(out)
    _require_convention(cfg)
    experts = _read_buffers(paths)
    epochs = len(experts[0][1]) - 1
    cfg = ExpertConfig(**{**asdict(cfg), "epochs": epochs, "num_experts": len(experts), "fit_on": "full-train"})
    data, pre, layout = _prepare_folder(cfg, out)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, channels=data.channels, num_classes=data.num_classes, image_size=data.image_size).to(device)
    if check_images > 0:
        split, x_check, y_check = _held_out(data, pre, max_images=check_images, device=device)
    for k, (source, expert) in enumerate(experts):
        if len(expert) != epochs + 1:
            raise ExpertError(f"expert {k} ({source}) has {len(expert)} checkpoints, expert 0 has {epochs + 1}")
        rows = []
        for e, params in enumerate(expert):
            shapes = [list(t.shape) for t in params]
            if shapes != [s for _, s in layout.as_list()]:
                raise ExpertError(
                    f"expert {k} ({source}), epoch {e}: parameter shapes {shapes} do not match the model {cfg.model} "
                    f"({[s for _, s in layout.as_list()]}); pass the --model/--width/--depth the buffer was trained with"
                )
            rows.append(torch.cat([t.float().reshape(-1) for t in params]))
        traj = torch.stack(rows)  # [E+1, P]
        extra: dict[str, Any] = {"imported": {"from": source}}
        if check_images > 0:
            extra["check"] = {"split": split, "images": int(len(y_check)), "epochs": [0, epochs],
                              "acc": stored_epoch_accuracy(model, traj[[0, epochs]], x_check, y_check)}
        _save_expert(out, k, {"trajectory": traj, "train_loss": torch.full((epochs,), float("nan")),
                              "val_acc": torch.full((epochs,), float("nan")), "seed": -1}, extra=extra)
    return ExpertSet(out)
