"""mttlss: dataset distillation by Matching Training Trajectories with Low-rank Space Sampling (MTT-LSS).

The pipeline, one module per stage: data -> models / augment -> experts -> parameterization + labels ->
matching -> distillation -> evaluate -> artifact / export / viz; ``cli`` is a thin layer on top.

    import mttlss
    cfg = mttlss.resolve_config(preset="cifar10_ipc1_lowrank")
    result = mttlss.distill(cfg, experts="experts/c10", out="runs/c10_ipc1")
    art = mttlss.load("runs/c10_ipc1/synthetic.safetensors")
"""

__version__ = "0.1.0"

from mttlss.artifact import Artifact, load, save_artifact  # noqa: E402
from mttlss.config import DistillConfig, resolve_config  # noqa: E402
from mttlss.distillation import distill  # noqa: E402
from mttlss.evaluate import evaluate_artifact  # noqa: E402
from mttlss.experts import ExpertConfig, ExpertSet, train_experts  # noqa: E402

__all__ = ["Artifact", "DistillConfig", "ExpertConfig", "ExpertSet", "distill", "evaluate_artifact", "load",
           "resolve_config", "save_artifact", "train_experts", "__version__"]
