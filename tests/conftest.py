"""Shared fixtures: one tiny experts folder on sklearn's digits (1x8x8, 10 classes), trained once per session."""

import pytest
import torch

from mttlss.config import resolve_config
from mttlss.experts import ExpertConfig, train_experts
from mttlss.models import build_model, flatten_params, model_spec

# One intra-op thread: the networks here are tiny, and on a small shared CPU two OpenMP threads that wait
# for each other made single iterations 10-50x slower (measured: 4 pixel iterations 4.8 s vs 0.2 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """precision=auto reads the CPU's flags: pin them to "no native bf16" so that every in-process test computes in
    fp32 whatever machine runs it (the tests of the rule itself patch native_bf16_flag again)."""
    monkeypatch.setattr("mttlss.distillation.native_bf16_flag", lambda: None)


def tiny_expert_config(**overrides) -> ExpertConfig:
    """The experts the distillation / CLI tests share (a few seconds on a CPU)."""
    kwargs = dict(dataset="digits", model=model_spec("convnet", width=16, depth=2), num_experts=2, epochs=6, batch_size=128)
    kwargs.update(overrides)
    return ExpertConfig(**kwargs)


@pytest.fixture(scope="session")
def experts_dir(tmp_path_factory):
    """Path of a finished experts folder: 2 experts x 6 epochs on digits. Treat it as read-only."""
    out = tmp_path_factory.mktemp("experts") / "digits"
    train_experts(tiny_expert_config(), out, progress=False)
    return out


def tiny_distill_config(**overrides):
    """Seconds-long distillation on the shared digits experts (6 stored epochs): low-rank, rank 2, shared mappers."""
    base = dict(ipc=1, param="lowrank", rank=2, subspaces="shared", syn_steps=5, expert_epochs=2, iterations=12,
                max_start_epoch=4, current_max_start_epoch=2, expansion_end_epoch=10, eval_every=6, eval_epochs=20,
                eval_runs=1, grid_every=0, checkpoint_every=4, seed=0)
    base.update(overrides)
    return resolve_config(**base)


def random_set(cls, *, seed: int = 0, **overrides):
    """A set of class ``cls`` (3 classes of 3x8x10 images, 4 per class, rank 2) with standard-normal parameters."""
    torch.manual_seed(seed)
    s = cls(**{"num_classes": 3, "image_shape": (3, 8, 10), "images_per_class": 4, "rank": 2, **overrides})
    with torch.no_grad():
        for p in s.parameters():
            p.normal_()
    return s


def unroll_problem(syn, dtype):
    """A tiny unroll around ``syn`` (a set of 3 classes of 3x16x16 images): a ConvNet (width 6, depth 2), the set's
    parameters and soft label logits drawn at random, and a start and target [P] 0.05 apart. Returns (model, syn,
    label_logits, start, target), all in ``dtype``."""
    torch.manual_seed(0)
    model = build_model(model_spec("convnet", width=6, depth=2), channels=3, num_classes=3, image_size=(16, 16)).to(dtype)
    gen = torch.Generator().manual_seed(3)
    syn = syn.to(dtype)
    with torch.no_grad():
        for p in syn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype))
    label_logits = torch.randn(syn.num_images, 3, generator=gen, dtype=dtype, requires_grad=True)
    start = flatten_params(model)
    target = start + 0.05 * torch.randn(start.shape, generator=gen, dtype=dtype)
    return model, syn, label_logits, start, target
