"""mttlss: distill a labelled image dataset into a tiny synthetic training set (MTT-LSS).

The whole pipeline, one line per stage (CIFAR-10 from the bundled npz file; `cifar10` with --data-root
reads or downloads torchvision's files instead):

    mttlss quickstart                                   # offline demo on sklearn digits, a few minutes on a CPU
    mttlss experts  --dataset npz:../shared/data/cifar10.npz --zca --num-experts 10 --epochs 50 --out experts/c10
    mttlss budget   --dataset cifar10 --ipc 1 --rank 4  # images per class that fit the storage budget (form A)
    mttlss budget   --dataset cifar10 --ipc 1 --rank 8 --param vector --subspaces shared   # form B: 76 per class
    mttlss distill  --experts experts/c10 --ipc 1 --param lowrank --preset cifar10_ipc1_lowrank --out runs/c10_ipc1
    mttlss evaluate runs/c10_ipc1/synthetic.safetensors --dataset npz:../shared/data/cifar10.npz --runs 5 --epochs 1000 --record
    mttlss export   runs/c10_ipc1/synthetic.safetensors --format ddranking --out export/c10_ipc1
    mttlss show     runs/c10_ipc1/synthetic.safetensors --out grid.png
    mttlss info     runs/c10_ipc1/synthetic.safetensors          # or an experts folder

Baselines at the same storage:

    mttlss random   --dataset npz:../shared/data/cifar10.npz --ipc 1 --experts experts/c10 --out random_ipc1.safetensors
    mttlss evaluate --full-data --dataset npz:../shared/data/cifar10.npz --epochs 50

Overrides: `--set key=value` (repeatable) on top of a preset (`mttlss presets` lists them, `--preset NAME`
or a YAML path). Unknown keys are rejected with the list of valid ones.

Synthetic sets (`--param`, or `--set param=...`): `lowrank` (MTT-LSS form A, the default: image = U_k S_i V_kᵀ
per channel; `rank`, `code`, `share_channels`), `vector` (form B: image = M_k b_i + mu_k over flattened images, a
PCA model; `rank`, `subspace_mean`, `mapper_downsample`), `pixel` (plain MTT). Both low-rank forms take
`subspaces`, `num_subspaces`, `pairing`, `count_labels` and `max_images_per_class` (method.md section 5).

Unroll memory (`--set memory=...`): `auto` (the default: full when its graph fits half the free memory, else
checkpoint), `full` (every inner step's graph kept, as MTT), `checkpoint` (exact, memory flat in syn_steps,
steps replayed in the backward), `tesla` (APPROXIMATE: TESLA's constant-memory gradient, the later steps'
Hessian terms dropped).

Several processes: `mttlss experts --workers 4 ...` or `torchrun --nproc_per_node 4 -m mttlss experts ...`
(each rank trains its share of the experts, one GPU per rank); `mttlss evaluate --workers 4` likewise.
Long runs resume: rerun the same command after an interruption (experts keep their finished experts, distill
its last checkpoint, evaluate its finished networks); a resumed run says so in one line.

Ctrl-C: experts, distill and evaluate finish the file they are writing (distill also its iteration, then a
checkpoint; a second Ctrl-C stops at once) and exit 130: "interrupted; rerun the same command to resume".
Errors: a mistake in what was asked for or given ends with one sentence on stderr that names the fix, exit code 2;
`--debug` (or MTTLSS_DEBUG=1) shows its traceback. Anything else is a bug: its traceback, and a request to report it.
A full disk names the full folder; the files written before it (checkpoint, finished experts) are intact.
An artifact is data, never a pointer: `evaluate` and `export --full-train-zca` read the dataset it names only
when that takes no path from it (digits; cifar10 etc. under --data-root or $MTTLSS_DATA, never downloaded
unasked); an npz:/folder: dataset must be named with --dataset.
The `mttlss` command (and `python -m mttlss`) first re-executes itself with tcmalloc or jemalloc preloaded where one
is installed, else tells glibc's malloc to keep freed memory (an inner step's activations are then not faulted back
in from the kernel); MTTLSS_ALLOCATOR=auto|tcmalloc|jemalloc|PATH.so|glibc|system chooses, `system` switches it off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from mttlss.artifact import format_manifest, load, read_manifest
from mttlss.baselines import random_real_artifact
from mttlss.config import CHOICES, DistillConfig, config_keys, load_preset, parse_set, preset_names, resolve_config
from mttlss.data import load_dataset, load_for_artifact
from mttlss.distillation import distill
from mttlss.distributed import init_distributed
from mttlss.errors import (DEBUG_ENV, EXIT_INTERRUPTED, EXIT_USER_ERROR, INTERRUPTED, DiskFullError, UserError,
                           is_disk_full, is_user_error, out_of_memory, user_message)
from mttlss.evaluate import EVAL_SPLITS, evaluate_artifact, evaluate_full_data, format_results, get_recipe, record_results
from mttlss.experts import OPTIMIZERS, ExpertConfig, ExpertSet, import_reference, train_experts
from mttlss.export import FORMATS, export
from mttlss.io_utils import atomic_write_json
from mttlss.labels import stored_label_floats
from mttlss.models import model_spec
from mttlss.parameterization import budget_report
from mttlss.preprocessing import CONVENTIONS, Preprocessor
from mttlss.quickstart import quickstart
from mttlss.runtime import tune_allocator


def _model_spec(args) -> dict:
    overrides = {k: v for k, v in (("width", args.width), ("depth", args.depth)) if v is not None}
    return model_spec(args.model, **overrides)


def _out_folder(path: str, *, flag: str = "--out") -> str:
    """An output folder: created when missing, refused (before any work is done) when it is a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path} is an existing file, but {flag} names a folder; give a folder path "
                        "(it is created if missing)")
    return path


def _out_file(path: str | None, *, flag: str = "--out", example: str = "NAME.safetensors") -> str | None:
    """An output file: refused (before any work is done) when it is a folder."""
    if path is not None and Path(path).is_dir():
        raise UserError(f"{flag} {path} is a folder, but {flag} names a file; give a file path such as "
                        f"{Path(path) / example}")
    return path


# ---------------------------------------------------------------------------------------------------------
# commands


def cmd_experts(args) -> int:
    cfg = ExpertConfig(dataset=args.dataset, data_root=args.data_root, model=_model_spec(args), num_experts=args.num_experts,
                       epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, preprocess="zca" if args.zca else "normalize",
                       dsa=not args.no_dsa, seed=args.seed, channels_last=args.fast, bf16=args.fast or args.bf16,
                       compile=args.fast or args.compile, device=args.device, **_normalization_args(args),
                       **_optimizer_args(args))
    experts = train_experts(cfg, _out_folder(args.out), workers=args.workers)
    if init_distributed().is_main:  # under torchrun, one rank reports
        print(f"preprocessing: {experts.preprocessor().describe()}")
        _print_expert_validity(experts)
    return 0


def cmd_experts_import(args) -> int:
    cfg = ExpertConfig(dataset=args.dataset, data_root=args.data_root, model=_model_spec(args),
                       preprocess="zca" if args.zca else "normalize", val_fraction=args.val_fraction, device=args.device,
                       **_normalization_args(args))
    experts = import_reference(args.paths, _out_folder(args.out), cfg=cfg, check_images=args.check_images)
    print(f"imported {len(experts.indices)} experts x {experts.epochs} epochs into {experts.folder}")
    print(f"preprocessing: {experts.preprocessor().describe()}")
    _print_expert_validity(experts)
    return 0


def _optimizer_args(args) -> dict:
    """ExpertConfig's optimiser keywords from --optimizer / --gsam-rho / --gsam-alpha (the GSAM ones only with gsam)."""
    given = {k: v for k, v in (("gsam_rho", args.gsam_rho), ("gsam_alpha", args.gsam_alpha)) if v is not None}
    if given and args.optimizer != "gsam":
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in given)
        one = len(given) == 1
        raise UserError(f"{flags} {'is' if one else 'are'} only for GSAM experts; add --optimizer gsam, or drop "
                        f"{'it' if one else 'them'}")
    return {"optimizer": args.optimizer, **given}


def _normalization_args(args) -> dict:
    """ExpertConfig's normalisation keywords from --normalization / --mean / --std (comma-separated floats)."""
    def floats(text):
        return None if text is None else tuple(float(v) for v in text.split(","))
    return {"normalization": args.normalization, "mean": floats(args.mean), "std": floats(args.std)}


def _print_expert_validity(experts) -> None:
    for line in experts.report_lines():
        print(line)


def cmd_budget(args) -> int:
    shape, classes = _shape_of(args.dataset, args.data_root)
    per_label = stored_label_floats(num_classes=classes, dtype=args.label_dtype, topk=args.label_topk)
    print(budget_report(num_classes=classes, image_shape=shape, ipc=args.ipc, param=args.param, rank=args.rank, code=args.code,
                        subspaces=args.subspaces, num_subspaces=args.num_subspaces, share_channels=args.share_channels,
                        count_labels=args.count_labels, label_floats_per_image=per_label,
                        max_images_per_class=args.max_images_per_class, subspace_mean=args.subspace_mean,
                        mapper_downsample=args.mapper_downsample))
    return 0


_KNOWN_SHAPES = {"cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10),
                 "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "digits": ((1, 8, 8), 10)}


def _shape_of(dataset: str, data_root):
    """Image shape and class count, without loading the data for the named datasets."""
    if dataset in _KNOWN_SHAPES:
        return _KNOWN_SHAPES[dataset]
    d = load_dataset(dataset, data_root=data_root)
    return (d.channels, *d.image_size), d.num_classes


def cmd_distill(args) -> int:
    if args.preset is None and args.ipc is None:
        raise ValueError("give --ipc N (or a --preset that sets it)")
    # flags override the preset only when given, so `--preset cifar10_ipc1_pixel` stays a pixel run
    kwargs = {k: v for k, v in (("ipc", args.ipc), ("param", args.param), ("iterations", args.iterations),
                                ("device", args.device)) if v is not None}
    cfg = resolve_config(preset=args.preset, overrides=parse_set(args.set), **kwargs)
    result = distill(cfg, experts=args.experts, out=_out_folder(args.out), argv=sys.argv)
    if not init_distributed().is_main:  # under torchrun, rank 0 reports
        return 0
    if result.artifact is None:
        print(f"stopped at iteration {result.history[-1]['iteration'] + 1 if result.history else 0}; rerun the same command to resume")
    else:
        print(f"wrote {result.artifact} (selected on {result.selection['select_on']}, iteration {result.selection['iteration']})")
    return 0


def _evaluate_full_data(args) -> dict:
    if not args.dataset:
        raise UserError("--full-data needs --dataset D (the real data to train on), e.g. --dataset digits")
    if args.epoch_mode not in (None, "decoded"):
        raise UserError(f"--epoch-mode {args.epoch_mode} applies to synthetic sets, not to --full-data; drop --epoch-mode")
    data = load_dataset(args.dataset, data_root=args.data_root)
    pre = Preprocessor.fit("zca" if args.zca else "normalize", data.x_train, dataset=args.dataset,
                           normalization=args.normalization)
    epochs = args.epochs or 50
    recipe = get_recipe("full-30", name=f"full-{epochs}", epochs=epochs, lr=args.lr or 0.01)
    return evaluate_full_data(data, preprocessor=pre, model_spec=model_spec(args.model or "convnet"), recipe=recipe,
                              runs=args.runs, seed=args.seed, device=args.device, workers=args.workers, split=args.split)


def cmd_evaluate(args) -> int:
    _out_file(args.json, flag="--json", example="results.json")
    if args.full_data:
        res = _evaluate_full_data(args)
    else:
        if not args.artifact:
            raise UserError("give an artifact path (mttlss evaluate FILE.safetensors), or --full-data --dataset D")
        res = evaluate_artifact(args.artifact, dataset=args.dataset, data_root=args.data_root, model=args.model,
                                runs=args.runs, recipe=args.recipe, epochs=args.epochs, epoch_mode=args.epoch_mode,
                                seed=args.seed, device=args.device,
                                workers=args.workers, split=args.split, resume=not args.no_resume)
    print(format_results(res), flush=True)  # first: a write that fails below costs only the write, not the evaluation
    if args.json and init_distributed().is_main:
        atomic_write_json(args.json, res)
    if args.record and not args.full_data:
        record_results(args.artifact, res)
    return 0


def cmd_random(args) -> int:
    path = random_real_artifact(dataset=args.dataset, data_root=args.data_root, ipc=args.ipc, out=_out_file(args.out),
                                experts=args.experts, seed=args.seed, zca=args.zca, normalization=args.normalization)
    print(f"wrote {path}")
    return 0


def cmd_info(args) -> int:
    path = Path(args.path)
    if path.is_dir() and (path / "synthetic.safetensors").exists() and not (path / "manifest.json").exists():
        path = path / "synthetic.safetensors"  # a distillation run folder: show its artifact
    if path.is_dir():
        experts = ExpertSet(path)
        m = experts.manifest
        print(json.dumps({k: m[k] for k in ("dataset", "model", "preprocessing", "optimizer", "augmentation", "epochs",
                                              "num_params", "versions")}, indent=2))
        print(f"finished experts: {len(experts.indices)}")
        _print_expert_validity(experts)
        return 0
    print(format_manifest(read_manifest(path)))
    return 0


def cmd_export(args) -> int:
    full_train_zca = None
    if args.full_train_zca:  # DD-Ranking whitens with a ZCA fitted on the FULL training split: re-whiten to match
        data = load_for_artifact(read_manifest(args.artifact)["dataset"], dataset=args.dataset, data_root=args.data_root,
                                 source=args.artifact, val_fraction=0.0)
        full_train_zca = Preprocessor.fit("zca", data.x_train, dataset=data.name, fitted_on="full-train")
    for p in export(args.artifact, fmt=args.format, out_dir=_out_folder(args.out), full_train_preprocessor=full_train_zca,
                    as_dataset=args.as_dataset):
        print(p)
    return 0


def cmd_show(args) -> int:
    from mttlss.viz import show_artifact  # here for its measured cost: matplotlib adds ~0.4 s to every CLI start

    for p in show_artifact(load(args.artifact), _out_file(args.out, example="grid.png")):
        print(p)
    return 0


def cmd_presets(args) -> int:
    if args.name:
        print(json.dumps(load_preset(args.name), indent=2))
    else:
        print("\n".join(preset_names()))
        print(f"\nconfig keys: {', '.join(config_keys())}")
    return 0


def cmd_quickstart(args) -> int:
    quickstart(out=_out_folder(args.out), fast=args.fast)
    return 0


# ---------------------------------------------------------------------------------------------------------
# parser: one function per command


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="cifar10 | cifar100 | svhn | mnist | fashion-mnist | digits | npz:PATH | folder:PATH")
    p.add_argument("--data-root", default=None, help="where torchvision datasets are read from (or downloaded to)")


def _add_normalization_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--normalization", default=None, choices=CONVENTIONS,
                   help="mean/std convention: the field's constants of a dataset (e.g. cifar10 for an npz copy of "
                        "CIFAR-10), or computed from this copy; default: the dataset's own constants when it has them")
    p.add_argument("--mean", default=None, metavar="M1,M2,M3", help="explicit per-channel mean (with --std)")
    p.add_argument("--std", default=None, metavar="S1,S2,S3", help="explicit per-channel std (with --mean)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="convnet", help="network name (convnet, convnet_d4, ...)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)


def _parser_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="offline end-to-end demo on sklearn digits")
    p.add_argument("--out", default="mttlss-quickstart")
    p.add_argument("--fast", action="store_true", help="an even smaller run (used by the tests)")
    p.set_defaults(func=cmd_quickstart)


def _parser_experts(sub) -> None:
    p = sub.add_parser("experts", help="train expert trajectories (or: mttlss experts import PATH... --out DIR)")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--num-experts", type=int, default=10)
    p.add_argument("--epochs", type=int, default=50, help="E; must be >= max_start_epoch - 1 + expert_epochs")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="sgd: MTT's plain SGD; gsam: GSAM steps around it, FTD's and DATM's flatter experts (twice the "
                        "forward/backward work)")
    p.add_argument("--gsam-rho", type=float, default=None,
                   help=f"with --optimizer gsam: the perturbation radius, constant (default {ExpertConfig.gsam_rho})")
    p.add_argument("--gsam-alpha", type=float, default=None,
                   help=f"with --optimizer gsam: the surrogate-gap weight (default {ExpertConfig.gsam_alpha}, FTD's "
                        "CIFAR-10 IPC 1/10 and DATM's value; FTD uses 1 for CIFAR-10 IPC 50 and CIFAR-100)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--zca", action="store_true", help="ZCA whitening (eps 0.1) instead of mean/std normalisation")
    _add_normalization_args(p)
    p.add_argument("--no-dsa", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="train experts in this many processes")
    p.add_argument("--fast", action="store_true", help="channels_last + bf16 autocast + torch.compile")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_experts)


def _parser_experts_import(sub) -> None:
    p = sub.add_parser("experts-import", help="convert reference replay_buffer_*.pt files")
    p.add_argument("paths", nargs="+")
    _add_data_args(p)
    _add_model_args(p)
    p.add_argument("--zca", action="store_true", help="the buffers' experts saw ZCA-whitened inputs (kornia-style, "
                   "eps 0.1, fitted on the full training split as the reference does)")
    _add_normalization_args(p)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="reference experts were trained on the full training split; 0 keeps that honest")
    p.add_argument("--check-images", type=int, default=5000,
                   help="held-out images each expert's first and last stored epoch are checked on (0: no check)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_experts_import)


def _parser_budget(sub) -> None:
    p = sub.add_parser("budget", help="images per class that fit the storage budget")
    _add_data_args(p)
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--param", default=DistillConfig.param, choices=CHOICES["param"],
                   help="lowrank: form A (U S V^T, default); vector: form B (one D x r mapper per subspace); pixel")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--code", default="full", choices=CHOICES["code"], help="form A only")
    p.add_argument("--subspaces", default=DistillConfig.subspaces, choices=CHOICES["subspaces"], help="default as in distill")
    p.add_argument("--num-subspaces", type=int, default=1)
    p.add_argument("--share-channels", action="store_true", help="form A only")
    p.add_argument("--subspace-mean", action="store_true", help="form B only: a mean per subspace, as distill's subspace_mean")
    p.add_argument("--mapper-downsample", type=int, default=DistillConfig.mapper_downsample,
                   help="form B only: mappers at H/f x W/f, upsampled bilinearly (2: half resolution, as RTP)")
    p.add_argument("--count-labels", action="store_true", help="charge soft labels against the budget")
    p.add_argument("--label-dtype", default=DistillConfig.label_dtype, choices=CHOICES["label_dtype"],
                   help="stored precision of soft labels, as distill's label_dtype")
    p.add_argument("--label-topk", type=int, default=None, help="classes kept per soft label, as distill's label_topk")
    p.add_argument("--max-images-per-class", type=int, default=None)
    p.set_defaults(func=cmd_budget)


def _parser_distill(sub) -> None:
    p = sub.add_parser("distill", help="optimise a synthetic set by trajectory matching")
    p.add_argument("--experts", required=True)
    p.add_argument("--ipc", type=int, default=None, help="storage budget in images per class (or from --preset)")
    p.add_argument("--param", default=None, choices=CHOICES["param"], help="default: the preset's, else lowrank")
    p.add_argument("--preset", default=None, help="preset name (mttlss presets) or YAML path")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_distill)


def _parser_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="train fresh networks on a synthetic set and report test accuracy")
    p.add_argument("artifact", nargs="?")
    p.add_argument("--full-data", action="store_true", help="the upper bound: train on the whole real training split")
    p.add_argument("--dataset", default=None, help="the data to test on; default: the artifact's, read only when it needs "
                   "no path (digits, or a torchvision set under --data-root / $MTTLSS_DATA): npz:/folder: must be named")
    p.add_argument("--data-root", default=None, help="where torchvision datasets are read from (or downloaded to)")
    p.add_argument("--zca", action="store_true", help="with --full-data")
    p.add_argument("--normalization", default=None, choices=CONVENTIONS, help="with --full-data: mean/std convention")
    p.add_argument("--model", default=None, help="another network, with its registry options (convnet is width "
                   "128; resnet18_bn, vgg11, alexnet, ...): a cross-architecture test; default: the artifact's own network")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--recipe", default="mtt-1000")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--epoch-mode", default=None, choices=CHOICES["eval_epoch_mode"],
                   help="what an epoch is (method.md 11.2); default: the recipe's (decoded). repaired: pairing=random "
                   "low-rank sets only, an epoch over the stored codes, re-paired with mappers each epoch")
    p.add_argument("--lr", type=float, default=None, help="with --full-data (default 0.01)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=EVAL_SPLITS)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--record", action="store_true", help="append the results to the artifact's manifest (after printing them)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-resume", action="store_true", help="train every network again: neither reuse nor keep the "
                   "finished networks of <artifact>.evaluations/ (e.g. to time an evaluation)")
    p.set_defaults(func=cmd_evaluate)


def _parser_random(sub) -> None:
    p = sub.add_parser("random", help="an artifact of IPC random real images per class (the baseline)")
    _add_data_args(p)
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--experts", default=None, help="reuse this experts folder's split, preprocessing and model")
    p.add_argument("--zca", action="store_true")
    p.add_argument("--normalization", default=None, choices=CONVENTIONS,
                   help="without --experts: mean/std convention (e.g. cifar10 for an npz copy of CIFAR-10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_random)


def _parser_info(sub) -> None:
    p = sub.add_parser("info", help="print an artifact's manifest or an experts folder's summary")
    p.add_argument("path")
    p.set_defaults(func=cmd_info)


def _parser_export(sub) -> None:
    p = sub.add_parser("export", help="write ddranking / imagefolder / npz")
    p.add_argument("artifact")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--full-train-zca", action="store_true",
                   help="ddranking, ZCA artifacts: re-whiten with a ZCA fitted on the full training split, as DD-Ranking does")
    p.add_argument("--dataset", default=None, help="with --full-train-zca: the training data (default: the artifact's, "
                   "read only when it needs no path; npz:/folder: must be named)")
    p.add_argument("--data-root", default=None, help="with --full-train-zca: where torchvision datasets are read from")
    p.add_argument("--as-dataset", default=None, choices=("cifar10", "cifar100"),
                   help="ddranking, mean/std artifacts of an npz:/folder: copy: re-normalise to DD-Ranking's constants "
                        "for this dataset (artifacts that recorded a convention or a CIFAR name need no flag)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)


def _parser_show(sub) -> None:
    p = sub.add_parser("show", help="draw the synthetic images (and mappers / basis vectors for lowrank and vector)")
    p.add_argument("artifact")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_show)


def _parser_presets(sub) -> None:
    p = sub.add_parser("presets", help="list shipped presets, or print one")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_presets)


# in the order `mttlss --help` lists the commands
_COMMANDS = (_parser_quickstart, _parser_experts, _parser_experts_import, _parser_budget, _parser_distill,
             _parser_evaluate, _parser_random, _parser_info, _parser_export, _parser_show, _parser_presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mttlss", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of any error (also: {DEBUG_ENV}=1); may follow the command too")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` anywhere on the line (``mttlss --debug distill ...`` or ``mttlss distill ... --debug``)."""
    return [a for a in argv if a != "--debug"], "--debug" in argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, debug = _pop_debug(argv)
    if argv[:2] == ["experts", "import"]:  # `mttlss experts import PATH ...` reads naturally; route it
        argv = ["experts-import", *argv[2:]]
    args = build_parser().parse_args(argv)
    return run_command(args, debug=debug or DEBUG_ENV in os.environ)


def run_command(args: argparse.Namespace, *, debug: bool = False) -> int:
    """Run a parsed command. A user error is one sentence on stderr and exit 2, Ctrl-C is exit 130 (the files
    written so far are whole, so a rerun resumes), a bug shows its traceback and asks to be reported;
    ``debug`` re-raises everything with its traceback."""
    prefix = f"mttlss {args.command}"
    try:
        tune_allocator()  # keep freed tensor memory in the process (1.6-2x on CPU, runtime.py); MTTLSS_ALLOCATOR=system: off
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: {INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            raise
        if not is_user_error(exc) and is_disk_full(exc):  # a full disk met outside the atomic writers
            exc = DiskFullError(getattr(args, "out", None) or os.getcwd(), detail=f"{type(exc).__name__}: {exc}"[:160])
        exc = out_of_memory(exc) or exc
        if is_user_error(exc):
            print(f"{prefix}: error: {user_message(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"{prefix}: internal error ({type(exc).__name__}): this is a bug in mttlss; please report it with the "
              f"command line and the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `python -m mttlss` (mttlss/__main__.py) also handles a Ctrl-C during these imports
    sys.exit(main())
