"""The distillation config: one dataclass, one place for every knob, named after the paper's symbols.

Presets are YAML files in ``mttlss/presets/`` (``<dataset>_ipc<k>_<param>.yaml``), each value commented with
its source row in method.md or marked as this project's choice. ``--set key=value`` overrides; unknown keys
and values of the wrong type are rejected with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# The allowed values of every option that takes a name, declared once: DistillConfig.validate checks them and
# the CLI offers them as `choices` (and evaluation recipes share the epoch modes).
CHOICES: dict[str, tuple[str, ...]] = {
    "param": ("lowrank", "pixel", "vector"),
    "code": ("full", "diag"),
    "subspaces": ("per_class", "shared"),
    "pairing": ("fixed", "random"),
    "init": ("correct", "real", "noise"),
    "select_on": ("val", "none"),
    "eval_epoch_mode": ("decoded", "budget", "repaired"),
    "lr_schedule": ("constant", "cosine"),
    "memory": ("auto", "full", "checkpoint", "tesla"),
    "precision": ("auto", "fp32", "bf16"),
    "labels": ("auto", "soft", "hard"),
    "label_init": ("experts", "onehot"),
    "label_dtype": ("float32", "float16"),
}

# Knobs that only one low-rank form reads, with their defaults. A value other than the default is refused under any
# other param (pixel sets, as before form B existed, ignore form A's), so a setting never silently does nothing;
# DistillConfig.validate and the budget solver (parameterization.solve_budget) both check it with check_form_knobs.
FORM_ONLY: dict[str, dict[str, Any]] = {
    "lowrank": {"code": "full", "share_channels": False},
    "vector": {"subspace_mean": False, "mapper_downsample": 1},
}


def check_form_knobs(param: str, values: dict[str, Any]) -> None:
    """Refuse a form-only knob in ``values`` set away from its default for another param (ValueError naming the fix)."""
    for form, knobs in FORM_ONLY.items():
        if form == param or (param == "pixel" and form == "lowrank"):
            continue
        for knob, default in knobs.items():
            if knob in values and values[knob] != default:
                value = str(values[knob]).lower() if isinstance(values[knob], bool) else values[knob]
                raise ValueError(f"{knob}={value} applies to param={form} only, not param={param}; set param={form}, "
                                 f"or drop {knob} (default {str(default).lower() if isinstance(default, bool) else default})")


@dataclass
class DistillConfig:
    # --- synthetic set -----------------------------------------------------------------------------------
    ipc: int = 1                      # storage budget in images per class (IPC x classes x C x H x W floats)
    param: str = "lowrank"            # "lowrank" (MTT-LSS, form A: U_k S_i V_k^T, method.md 5.1) | "pixel" (plain MTT)
                                      # | "vector" (form B: x_i = M_k b_i (+ mu_k) over flattened images, method.md 5.2)
    rank: int = 4                     # r: rank of each dimension mapper (form B: columns of M_k, the length of b_i)
    code: str = "full"                # form A's basis vectors per image: "full" r x r core | "diag"
    subspaces: str = "shared"         # "per_class" (K_c subspaces per class) | "shared" (K in all, used by every class)
    num_subspaces: int = 1            # K_c (per_class) or K (shared)
    share_channels: bool = False      # form A: one mapper pair for all channels (codes stay per channel)
    # form B only (param=vector); the defaults reproduce method.md 5.3's form B table exactly
    subspace_mean: bool = False       # a learnable mean mu_k per subspace (PCA's centre): costs K x D' floats of budget
    mapper_downsample: int = 1        # f: mappers (and means) at C x H/f x W/f, decoded then upsampled bilinearly to
                                      # H x W (RTP stores half-resolution bases: f=2, a quarter of the mapper floats);
                                      # 1 = full resolution; must divide H and W
    pairing: str = "fixed"            # "fixed" | "random": a code may meet any mapper its class may use ("sampling")
    max_images_per_class: int | None = None  # cap on decoded images per class (evaluation and label cost grow with it)
    count_labels: bool = False        # charge soft labels against the budget (DATM/TESLA do not); with labels=auto
                                      # too, so a hard-label start then has fewer images than the budget allows
    init: str = "correct"             # "correct": real images an expert classifies correctly (DATM) | "real" | "noise"

    # --- labels (method.md section 6) ---------------------------------------------------------------------
    labels: str = "auto"              # "auto": before the first iteration soft and hard labels compete on validation
                                      # (select_on=val), the better one is the start | "soft" (DATM) | "hard"
    soft_labels: bool = True          # the older switch, kept for old configs and presets: False means labels=hard
    label_init: str = "experts"       # soft labels' start, always with the own class on top (labels.py): "experts"
                                      # (DATM's mean logits, the own class raised where no expert is right) | "onehot"
    label_temperature: float | None = None  # experts: logits / T; None: chosen on validation among labels.TEMPERATURES
    label_confidence: float | None = None   # onehot: own-class probability; None: chosen among labels.CONFIDENCES
    # how the artifact stores soft labels (hard labels ignore both: class-major order implies them); validation during
    # the run and count_labels use the stored form, the learnable logits stay float32 throughout
    label_dtype: str = "float32"      # stored precision of the soft label values: "float32" | "float16" (half the bytes)
    label_topk: int | None = None     # k: store only each image's k most likely classes (log-probabilities + int16 class
                                      # indices, the rest of the mass spread evenly on load); None: every class
    lr_y: float = 2.0                 # eta_y: SGD lr of the label logits (DATM: 2 to 10)
    label_momentum: float = 0.9

    # --- matching (method.md sections 3, 7, 8, 9) -------------------------------------------------------------
    syn_steps: int = 20               # N: student steps on synthetic data per outer iteration
    expert_epochs: int = 2            # M: expert epochs between start and target checkpoints
    min_start_epoch: int = 0          # T-
    current_max_start_epoch: int = 10  # T_cur: the progressive window's initial upper bound
    max_start_epoch: int = 20         # T+
    expansion_end_epoch: int = 1000   # E_exp: outer iterations over which U grows from T_cur to T+
    progressive: bool = True          # False: plain MTT window [T-, T+)
    batch_syn: int | None = None      # b: synthetic images per inner step (None: IPC x classes, what one step over the
                                      # pixel set of the same budget costs; the run logs the choice)
    lr_teacher: float = 0.01          # alpha_0: initial learnable step size (NOT the expert lr)
    lr_lr: float = 1e-5               # eta_alpha
    alpha_min: float = 1e-3           # floor on alpha after each step (FreD/HaBa clamp); keeps it positive
    alpha_max: float | None = None
    lr_img: float = 100.0             # eta_x: pixels (pixel set) or codes (lowrank), SGD momentum 0.5
    lr_mapper: float | None = None    # dimension mappers; None: lr_img / images per subspace (a mapper's grad sums over them)
    momentum_img: float = 0.5
    lr_schedule: str = "constant"     # "constant" (the field) | "cosine": lr_img, mappers and lr_y decay to 0 at `iterations`
    threshold: float = 1.0            # tau: skip the update when L > tau (student ended farther than it started)
    max_consecutive_skips: int = 200  # then stop with a message naming the knobs
    threshold_probe: int = 3          # iterations: before the first update, the loss of the first this-many segments is
                                      # measured (no backward); when every one exceeds threshold, the guard would block
                                      # the whole run (weak experts), so it is lifted for the run and the log says so.
                                      # 0: never (a threshold set to skip on purpose)
    dsa: bool = True                  # DSA inside every inner step (and in evaluation)
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    # how the unroll is differentiated (method.md section 3); full and checkpoint give the same gradients
    memory: str = "auto"              # "full": keep every inner step's graph (memory ~ syn_steps x batch_syn, as in MTT)
                                      # "checkpoint": replay one step at a time in the backward (memory flat in syn_steps)
                                      # "auto": full when its measured graph size fits half the free memory, else checkpoint
                                      # "tesla": APPROXIMATE, TESLA's constant-memory gradient (drops the later steps'
                                      # Hessian terms); never chosen by auto; a resume cannot switch it on or off
    precision: str = "auto"           # the student network's: "fp32" | "bf16" (convolutions and linear layers in
                                      # bf16, all else fp32: matching.BF16Products) | "auto": bf16 on a CPU
                                      # with native bf16 (amx_bf16 or avx512_bf16) where an inner step's forward is >= 0.5 GFLOP, else fp32 (bf16
                                      # ran 16x slower without; not measured on GPUs); a resume keeps the
                                      # precision the run started in

    # --- the loop -------------------------------------------------------------------------------------------------
    iterations: int = 5000            # outer iterations (MTT 5,000; DATM 10,000); 0: the initialisation itself
    seed: int = 0
    checkpoint_every: int = 50        # iterations between atomic checkpoints (resume point)
    grid_every: int = 500             # iterations between image-grid pictures (0: off)
    eval_every: int = 500             # iterations between validation evaluations (0: only at the end)
    eval_runs: int = 1                # networks per validation evaluation
    eval_epochs: int = 300            # epochs per validation evaluation network (cheaper than the final protocol)
    eval_epoch_mode: str = "decoded"  # "decoded" | "budget" | "repaired" (pairing=random only; method.md 11.2)
    eval_batch_size: int = 256
    select_on: str = "val"            # "val": keep the synthetic set with the best validation accuracy | "none": the last
    ema_decay: float | None = None    # an EMA of the synthetic set's factors (pixels, or mappers and codes; not labels or
                                      # alpha), updated after every applied update, is what validation, selection and the
                                      # artifact use (FTD: 0.999 to 0.9999, method.md 11.4); None or 0: off, the raw set
    device: str | None = None         # None: cuda when present, else cpu
    tensorboard: bool = False         # also log to TensorBoard (needs the `tensorboard` extra)
    wandb: bool = False               # also log to Weights & Biases (needs the `wandb` extra; offline without an account)
    force: bool = False               # start even when the memory estimate says the run does not fit
    stop_after: int | None = None     # stop (with a checkpoint) after this many iterations of this call; rerun to resume

    def validate(self) -> "DistillConfig":
        for name, allowed in CHOICES.items():
            _choice(name, getattr(self, name), allowed)
        for name in ("ipc", "rank", "syn_steps", "expert_epochs", "num_subspaces", "checkpoint_every", "mapper_downsample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.iterations < 0:  # 0 writes the initialised set unchanged: the undistilled baseline
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        for name in ("lr_teacher", "lr_img", "alpha_min"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}: a step size <= 0 cannot train")
        if self.threshold_probe < 0:
            raise ValueError(f"threshold_probe must be >= 0 (iterations probed before the first update), got "
                             f"{self.threshold_probe}; 0 turns the probe off")
        for name in ("lr_lr", "lr_y"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_mapper is not None and self.lr_mapper < 0:
            raise ValueError(f"lr_mapper must be >= 0, got {self.lr_mapper}")
        self._validate_labels()
        check_form_knobs(self.param, {k: getattr(self, k) for knobs in FORM_ONLY.values() for k in knobs})
        if self.eval_epoch_mode == "repaired" and (self.param == "pixel" or self.pairing != "random"):
            raise ValueError("eval_epoch_mode=repaired re-pairs codes with mappers each epoch, so it needs param=lowrank "
                             f"or vector and pairing=random (got param={self.param}, pairing={self.pairing}); set "
                             "pairing=random, or eval_epoch_mode=decoded")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}: set e.g. 0.999 (FTD uses 0.999 to "
                             "0.9999), or null or 0 to turn the average off")
        if self.max_start_epoch <= self.min_start_epoch:
            raise ValueError("max_start_epoch (T+) must exceed min_start_epoch (T-)")
        if self.progressive and not (self.min_start_epoch < self.current_max_start_epoch <= self.max_start_epoch):
            raise ValueError(
                "with progressive=true, current_max_start_epoch (T_cur) must lie in (min_start_epoch, max_start_epoch]"
            )
        return self

    def _validate_labels(self) -> None:
        if not self.soft_labels and self.labels == "soft":
            raise ValueError("soft_labels=false asks for hard labels but labels=soft; drop soft_labels (labels=auto|soft|hard "
                             "replaces it)")
        if self.label_temperature is not None and not self.label_temperature > 0:
            raise ValueError(f"label_temperature must be positive, got {self.label_temperature} (null: chosen on validation)")
        if self.label_confidence is not None and not 0 < self.label_confidence < 1:
            raise ValueError(f"label_confidence must lie in (0, 1), got {self.label_confidence} (null: chosen on validation)")
        if self.label_topk is not None and self.label_topk < 1:
            raise ValueError(f"label_topk must be >= 1 (classes kept per image), got {self.label_topk}; null keeps every class")

    @property
    def label_mode(self) -> str:
        """"auto", "soft" or "hard": ``labels``, where the older ``soft_labels=false`` means "hard"."""
        return "hard" if not self.soft_labels else self.labels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


# ---------------------------------------------------------------------------------------------------------
# overrides and presets


def config_keys() -> list[str]:
    return [f.name for f in fields(DistillConfig)]


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(DistillConfig)
    return {f.name: hints[f.name] for f in fields(DistillConfig)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the dataclass annotation (int, float, bool, str, or X | None)."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-07" (no dot) as a string, e.g. in the shipped presets
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}")


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    types_ = _field_types()
    out = dict(base)
    for key, value in overrides.items():
        if key not in types_:
            raise KeyError(f"unknown config key {key!r}; valid keys: {', '.join(types_)}")
        out[key] = _coerce(key, value, types_[key])
    return out


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["syn_steps=30", "lr_img=1e3"]`` -> dict; values parsed as YAML scalars ("1e3" -> 1000.0)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e3" as a string; accept scientific notation without a dot
                value = float(value) if any(c in value.lower() for c in "e.") else value
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("mttlss.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset by name (``cifar10_ipc1_lowrank``) or a path to a YAML file, as a dict of config values."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        text = path.read_text()
    else:
        res = resources.files("mttlss.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise KeyError(f"unknown preset {name_or_path!r}; shipped presets: {', '.join(preset_names())}")
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    data.pop("source", None)  # documentation only
    return apply_overrides({}, data)


def resolve_config(*, preset: str | None = None, overrides: dict[str, Any] | None = None, **kwargs: Any) -> DistillConfig:
    """defaults <- preset <- keyword arguments <- --set overrides, type-checked and validated."""
    values: dict[str, Any] = load_preset(preset) if preset else {}
    values = apply_overrides(values, kwargs)
    values = apply_overrides(values, overrides or {})
    return DistillConfig(**values).validate()
