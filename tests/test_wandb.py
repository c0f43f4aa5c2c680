"""wandb=true: the JSONL record's numbers and the image grids go to wandb (offline here), or a clear message."""

import json
import sys

import pytest

from mttlss.config import resolve_config
from mttlss.distillation import distill
from mttlss.records import SinkError


def _cfg(**kw):
    base = dict(ipc=1, param="lowrank", rank=2, subspaces="shared", syn_steps=3, expert_epochs=2, iterations=4,
                max_start_epoch=3, current_max_start_epoch=2, expansion_end_epoch=4, eval_every=2, eval_epochs=5,
                eval_runs=1, grid_every=2, checkpoint_every=2, seed=0, wandb=True)
    base.update(kw)
    return resolve_config(**base)


def test_without_the_extra_the_run_says_what_to_install(experts_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(SinkError, match=r"pip install 'mttlss\[wandb\]'"):
        distill(_cfg(), experts=experts_dir, out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_offline_run_logs_what_the_jsonl_log_holds(experts_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(key, value)
    logged = []  # what reached the real wandb run, call by call
    real_init = wandb.init

    def spying_init(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, step=None: (logged.append((step, dict(data))), real_log(data, step=step))[1]
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    out = tmp_path / "run"
    distill(_cfg(), experts=experts_dir, out=out, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    scalars = [(step, data) for step, data in logged if "grid" not in data]
    assert [step for step, _ in scalars] == [r["iteration"] + 1 for r in records]  # step = finished iterations
    for (_, data), record in zip(scalars, records):
        for key in ("loss", "syn_lr", "start_epoch", "max_start_epoch"):
            assert data[key] == record[key], key
        assert data.get("val_acc") == record.get("val_acc")
    assert sum("val_acc" in d for _, d in scalars) == 2  # validated at iterations 2 and 4
    grids = [(step, data["grid"]) for step, data in logged if "grid" in data]
    assert [step for step, _ in grids] == [2, 4] and all(isinstance(g, wandb.Image) for _, g in grids)
    # offline: the run is on disk for `wandb sync`, with the numbers' names, the config and the pictures in it
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    stored = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"max_start_epoch", b"val_acc", b"syn_lr", b"batch_syn"):
        assert key in stored, key
    assert len(list((runs[0] / "files" / "media" / "images").glob("grid_*.png"))) == 2
