"""On the CPU, the same command with the same seeds gives the same tensors bit for bit (README: what is not)."""

from __future__ import annotations

import hashlib

import torch
from conftest import tiny_expert_config
from safetensors import safe_open

from mttlss.config import resolve_config
from mttlss.distillation import distill
from mttlss.experts import train_experts


def _files(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_experts_twice_are_byte_identical(tmp_path):
    cfg = tiny_expert_config(num_experts=2, epochs=2)
    train_experts(cfg, tmp_path / "a", progress=False)
    train_experts(cfg, tmp_path / "b", progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert "expert_001.safetensors" in a and a == b  # manifest, preprocessing state and every trajectory


def test_distilled_artifact_tensors_twice_are_bit_identical(experts_dir, tmp_path):
    cfg = resolve_config(ipc=1, param="lowrank", rank=2, subspaces="shared", syn_steps=4, expert_epochs=2, iterations=4,
                         max_start_epoch=3, current_max_start_epoch=2, expansion_end_epoch=4, eval_every=2,
                         eval_epochs=5, eval_runs=1, grid_every=0, checkpoint_every=2, seed=3)
    arts = [distill(cfg, experts=experts_dir, out=tmp_path / name, progress=False).artifact for name in ("a", "b")]
    a, b = (_tensors(p) for p in arts)
    assert a.keys() == b.keys() and "labels" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 4
