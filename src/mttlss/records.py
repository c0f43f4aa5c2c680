"""Where a distillation run's per-iteration records go: one small interface, one list of sinks.

A record is the JSON-able dict of one outer iteration (``iteration``, ``loss``, ``syn_lr``, ``start_epoch``,
``max_start_epoch``, ``skipped``, ``seconds``, ``lr_factor``, ``val_acc`` when validated). The loop hands each
record to ``Sinks.write`` once; every sink takes what it shows. A new sink (wandb, say) is one class with
``write(record)`` and ``close()`` here, plus one line in ``open_sinks``.
"""

from __future__ import annotations

import json
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


class Sinks:
    """Fans every record out to each sink, in order; closes them all."""

    def __init__(self, sinks: list[RecordSink]):
        self.sinks = list(sinks)

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_sinks(cfg: DistillConfig, *, out: Path | None, log: Path | None, progress: bool, initial: int) -> Sinks:
    """The sinks a run writes to: ``log`` (JSONL) when given, TensorBoard when ``cfg.tensorboard``, a progress bar
    when ``progress``; ``initial`` is the iteration a resumed run starts from."""
    sinks: list[RecordSink] = []
    if log is not None:
        sinks.append(JsonlSink(path=log))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(log_dir=(out or Path("runs")) / "tensorboard"))
    if progress:
        sinks.append(ProgressSink(total=cfg.iterations, initial=initial))
    return Sinks(sinks)
