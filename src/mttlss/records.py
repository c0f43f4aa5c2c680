"""Where a distillation run's per-iteration records go: one small interface, one list of sinks.

A record is the JSON-able dict of one outer iteration (``iteration``, ``loss``, ``syn_lr``, ``start_epoch``,
``max_start_epoch``, ``skipped``, ``seconds``, ``lr_factor``, ``val_acc`` when validated). The loop hands each
record to ``Sinks.write`` once, and each image grid it draws to ``Sinks.picture``; every sink takes what it shows.
A new sink is one class with ``write(record)`` and ``close()`` (optionally ``picture(name, path, step)``) here,
plus one line in ``open_sinks``.
"""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from mttlss.config import DistillConfig
from mttlss.errors import UserError
from mttlss.io_utils import append_text

SCALARS = ("loss", "syn_lr", "max_start_epoch", "val_acc")  # what dashboards plot, when a record has it


class SinkError(UserError, RuntimeError):
    """A sink that cannot start; the message names the fix (usually an extra to install)."""


class RecordSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON line per record to ``log.jsonl`` (opened per record, so a killed run loses at most
    the line it was writing; a resumed run drops the records after its checkpoint first)."""

    def __init__(self, *, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        append_text(self.path, json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class ProgressSink:
    """A tqdm bar over the run's iterations, with the loss, alpha and the start-epoch bound U."""

    def __init__(self, *, total: int, initial: int):
        self.bar = tqdm(total=total, initial=initial, desc="distill", disable=None)  # disable=None: quiet off a terminal

    def write(self, record: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['syn_lr']:.4f}", U=record["max_start_epoch"])

    def close(self) -> None:
        self.bar.close()


class TensorBoardSink:
    """The ``SCALARS`` of each record, at step iteration + 1 (the number of finished iterations)."""

    def __init__(self, *, log_dir: Path):
        try:  # imported here: TensorBoard is an optional extra
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise SinkError("tensorboard=true needs the extra: pip install 'mttlss[tensorboard]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        for key in SCALARS:
            if key in record:
                self.writer.add_scalar(key, record[key], record["iteration"] + 1)

    def close(self) -> None:
        self.writer.close()


_WANDB_EXTRA = "wandb=true needs the extra: pip install 'mttlss[wandb]' (or pip install wandb)"


def _import_wandb():
    try:  # imported here: wandb is an optional extra, and importing it costs about a second
        import wandb
    except ImportError as exc:
        raise SinkError(_WANDB_EXTRA) from exc
    return wandb


def _wandb_account() -> bool:
    """Whether wandb has credentials here (an API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    """What log.jsonl holds, to Weights & Biases: every number of each record (loss, syn_lr = alpha, start_epoch,
    max_start_epoch = the window's bound U, val_acc, label statistics, seconds, ...) under its JSONL name at step
    iteration + 1, the run's config, and the image grids as pictures. Offline (files under ``dir``/wandb, to upload
    later with ``wandb sync``) unless an account is configured; ``WANDB_MODE`` overrides."""

    def __init__(self, *, cfg: DistillConfig, dir: Path, name: str | None):
        wandb = _import_wandb()
        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_account() else "offline")
        dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mttlss"), dir=str(dir), name=name,
                              config=cfg.to_dict(), mode=mode)

    def write(self, record: dict[str, Any]) -> None:
        numbers = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float)) and v is not None}
        self.run.log(numbers, step=record["iteration"] + 1)

    def picture(self, name: str, path: Path, step: int) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def require_extras(cfg: DistillConfig) -> None:
    """Fail before any work when a sink the config asks for cannot start (its extra is missing)."""
    if cfg.wandb:
        _import_wandb()


class Sinks:
    """Fans every record out to each sink, in order; closes them all."""

    def __init__(self, sinks: list[RecordSink]):
        self.sinks = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def picture(self, name: str, path: Path, step: int) -> None:
        """A picture the run drew (``path``, a PNG) at ``step`` finished iterations, to the sinks that show pictures."""
        for sink in self.sinks:
            if hasattr(sink, "picture"):
                sink.picture(name, path, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(cfg: DistillConfig, *, out: Path | None, log: Path | None, progress: bool, initial: int,
               main: bool = True) -> Sinks:
    """The sinks a run writes to: ``log`` (JSONL) when given, TensorBoard when ``cfg.tensorboard``, wandb when
    ``cfg.wandb`` (on the ``main`` process only), a progress bar when ``progress``; ``initial`` is the iteration a
    resumed run starts from."""
    sinks: list[RecordSink] = []
    if log is not None:
        sinks.append(JsonlSink(path=log))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(log_dir=(out or Path("runs")) / "tensorboard"))
    if cfg.wandb and main:
        sinks.append(WandbSink(cfg=cfg, dir=out or Path("."), name=out.name if out is not None else None))
    if progress:
        sinks.append(ProgressSink(total=cfg.iterations, initial=initial))
    return Sinks(sinks)
