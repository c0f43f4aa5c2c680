"""mttlss: dataset distillation by Matching Training Trajectories with Low-rank Space Sampling."""

__version__ = "0.1.0"
