"""mttlss: dataset distillation by Matching Training Trajectories with Low-rank Space Sampling (MTT-LSS).

The pipeline, one module per stage; each module uses only modules above it in this list:

    config          every distillation knob and the allowed values of each option (one dataclass)
    data            real datasets, the validation split, the manifest's dataset record and its loader
    preprocessing   pixel space <-> training space (mean/std normalisation, ZCA)
    models          networks, their registry, and the flat parameter layout [P] of trajectories
    augment         DSA (differentiable siamese augmentation)
    gsam            GSAM, sharpness-aware steps around SGD (an expert-training option)
    training        losses, one epoch, accuracy, one or several seeded networks trained and tested
    experts         expert trajectories: train, store, read
    parameterization  pixel / low-rank (form A; form B, vector) synthetic sets and the storage-budget solver
    ema             an exponential moving average of a synthetic set's parameters (FTD's EMA of the images)
    labels          hard / learnable soft labels and their initialisation from the experts
    initialization  the synthetic set's starting point (budget, correctly classified real images)
    matching        the functional student unroll, the trajectory loss, the start-epoch window
    artifact        the self-describing artifact file
    viz             pictures: image grids, dimension mappers and codes, training curves
    evaluate        the evaluation protocol: named recipes, artifacts, the full-data bound, reports
    records         where a run's per-iteration records go (log.jsonl, progress bar, TensorBoard)
    distillation    the outer loop
    baselines, export, quickstart   random real images at the same storage, other tools' formats, the demo
    cli             a thin layer on top (errors, schema, io_utils, distributed and runtime are small utilities used
                    throughout: user errors and a full disk; manifest checks; atomic files and Ctrl-C; torchrun ranks
                    and the rank-sliced inner step; the CPU allocator setting)

    import mttlss
    cfg = mttlss.resolve_config(preset="cifar10_ipc1_lowrank")
    result = mttlss.distill(cfg, experts="experts/c10", out="runs/c10_ipc1")
    art = mttlss.load("runs/c10_ipc1/synthetic.safetensors")
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the version is defined once, in pyproject.toml; set before the imports below, which record it
    __version__ = version("mttlss")
except PackageNotFoundError:  # imported from a source tree that was never installed (pip install -e .)
    __version__ = "0+unknown"

# The public names, loaded on first use (PEP 562): `import mttlss` and `python -m mttlss` stay light (no torch) until a
# name is needed, so the command line can handle Ctrl-C from its first moment (__main__.py) and `mttlss --help` is quick.
_EXPORTS = {"Artifact": "artifact", "load": "artifact", "save_artifact": "artifact", "DistillConfig": "config",
            "resolve_config": "config", "distill": "distillation", "evaluate_artifact": "evaluate",
            "ExpertConfig": "experts", "ExpertSet": "experts", "train_experts": "experts", "tune_allocator": "runtime"}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mttlss' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"mttlss.{_EXPORTS[name]}"), name)
    globals()[name] = value  # once loaded, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
