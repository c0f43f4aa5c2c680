"""mttlss: dataset distillation by Matching Training Trajectories with Low-rank Space Sampling."""

__version__ = "0.1.0"

from mttlss.artifact import Artifact, load, save_artifact  # noqa: E402  (mttlss.load is the public entry point)

__all__ = ["Artifact", "load", "save_artifact", "__version__"]
