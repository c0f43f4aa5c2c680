"""Shared fixtures: one tiny experts folder on sklearn's digits (1x8x8, 10 classes), trained once per session."""

import pytest
import torch

from mttlss.experts import ExpertConfig, train_experts
from mttlss.models import model_spec

# One intra-op thread: the networks here are tiny, and on a small shared CPU two OpenMP threads that wait
# for each other made single iterations 10-50x slower (measured: 4 pixel iterations 4.8 s vs 0.2 s).
torch.set_num_threads(1)


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
