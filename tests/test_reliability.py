"""Reliability of the command line: every bad input is one sentence and exit 2, and damages nothing.

Each case of issue 14 runs through the real CLI in a subprocess (the way a user meets it) and must end with exit
code 2, a message on stderr without a traceback, and the protected experts folder and artifact unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import mttlss
from mttlss import cli

SRC = Path(mttlss.__file__).resolve().parents[1]  # the mttlss under test, handed to the subprocesses


def run_cli(*argv, env=None, timeout=120):
    base = {k: v for k, v in os.environ.items() if k != "MTTLSS_DEBUG"}
    full_env = {**base, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "mttlss", *map(str, argv)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def tree_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (and of the paths themselves when files)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def rewrite_artifact_manifest(src: Path, dst: Path, edit) -> Path:
    """A copy of the artifact ``src`` whose manifest ``edit(manifest)`` changed (tensors as they were)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(f.metadata()["mttlss"])
    edit(manifest)
    save_file(tensors, str(dst), metadata={"mttlss": json.dumps(manifest)})
    return dst


def edited_experts(src: Path, dst: Path, edit) -> Path:
    """A copy of the experts folder ``src`` whose manifest ``edit(manifest)`` changed; edit may return a new one."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest = edit(manifest) or manifest
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def protected(experts_dir, tmp_path_factory):
    """An experts folder and an artifact that no bad command may change."""
    root = tmp_path_factory.mktemp("protected")
    experts = root / "experts"
    shutil.copytree(experts_dir, experts)
    art = root / "art.safetensors"
    assert cli.main(["random", "--dataset", "digits", "--ipc", "1", "--experts", str(experts), "--out", str(art)]) == 0
    return {"root": root, "experts": experts, "art": art}


def _npz(path: Path, *, y_train, y_test, channels=1, x_train=None) -> Path:
    rng = np.random.default_rng(0)
    shape = (8, 8) if channels == 1 else (8, 8, channels)
    x_train = rng.integers(0, 256, (len(y_train), *shape), dtype=np.uint8) if x_train is None else x_train
    np.savez(path, x_train=x_train, y_train=np.asarray(y_train), x_test=rng.integers(0, 256, (len(y_test), *shape),
             dtype=np.uint8), y_test=np.asarray(y_test))
    return path


# Each case: (name, setup(protected, tmp) -> argv, words the message must contain)

SMALL = ["max_start_epoch=3", "current_max_start_epoch=2", "expansion_end_epoch=4", "expert_epochs=2", "syn_steps=2",
         "iterations=1", "labels=hard", "select_on=none", "grid_every=0"]


def _distill(experts, out) -> list:
    """A distill command the 6-epoch test experts can run (so that it gets as far as the data)."""
    return ["distill", "--experts", experts, "--ipc", "1", "--param", "pixel", "--out", out,
            *[a for item in SMALL for a in ("--set", item)]]


def _out_is_a_file_export(p, tmp):
    (tmp / "file").write_text("x")
    return ["export", p["art"], "--format", "npz", "--out", tmp / "file"]


def _out_is_a_file_distill(p, tmp):
    (tmp / "file").write_text("x")
    return ["distill", "--experts", p["experts"], "--ipc", "1", "--out", tmp / "file"]


def _manifest_is_a_list(p, tmp):
    return ["info", edited_experts(p["experts"], tmp / "e", lambda m: [m])]


def _two_class_names(p, tmp):
    def edit(m):
        m["dataset"]["class_names"] = ["a", "b"]
    return ["distill", "--experts", edited_experts(p["experts"], tmp / "e", edit), "--ipc", "1", "--out", tmp / "run"]


def _artifact_two_class_names(p, tmp):
    art = rewrite_artifact_manifest(p["art"], tmp / "a.safetensors",
                                    lambda m: m["dataset"].update(class_names=["a", "b"]))
    return ["export", art, "--format", "imagefolder", "--out", tmp / "png"]


def _epochs_is_a_word(p, tmp):
    def edit(m):
        m["epochs"] = "four"
    return ["info", edited_experts(p["experts"], tmp / "e", edit)]


def _claims_three_classes(p, tmp):
    def edit(m):
        m["dataset"].update(num_classes=3, class_names=["0", "1", "2"])
    return ["distill", "--experts", edited_experts(p["experts"], tmp / "e", edit), "--ipc", "1", "--out", tmp / "run"]


def _experts_from_another_dataset(p, tmp):
    rgb = _npz(tmp / "rgb.npz", y_train=np.arange(40) % 10, y_test=np.arange(10), channels=3)

    def edit(m):
        m["dataset"]["name"] = f"npz:{rgb}"
    return _distill(edited_experts(p["experts"], tmp / "e", edit), tmp / "run")


def _width_mismatch(p, tmp):
    experts = tmp / "e"
    shutil.copytree(p["experts"], experts)
    import torch

    save_file({"trajectory": torch.zeros(7, 12), "train_loss": torch.zeros(6), "val_acc": torch.zeros(6)},
              str(experts / "expert_000.safetensors"), metadata={"mttlss_expert": json.dumps({"index": 0})})
    return _distill(experts, tmp / "run")


def _random_bytes_npz(p, tmp):
    (tmp / "noise.npz").write_bytes(os.urandom(300))
    return ["experts", "--dataset", f"npz:{tmp / 'noise.npz'}", "--out", tmp / "ex"]


def _labels_five_to_seven(p, tmp):
    path = _npz(tmp / "shifted.npz", y_train=5 + np.arange(30) % 3, y_test=np.arange(6) % 3)
    return ["experts", "--dataset", f"npz:{path}", "--num-experts", "1", "--epochs", "1", "--out", tmp / "ex"]


def _artifact_as_experts(p, tmp):
    return ["distill", "--experts", p["art"], "--ipc", "1", "--out", tmp / "run"]


def _unknown_key(p, tmp):
    return ["distill", "--experts", p["experts"], "--ipc", "1", "--set", "lr_imgs=10", "--out", tmp / "run"]


def _artifact_names_an_npz_path(p, tmp):
    art = rewrite_artifact_manifest(p["art"], tmp / "a.safetensors",
                                    lambda m: m["dataset"].update(name=f"npz:{tmp / 'elsewhere' / 'x.npz'}"))
    return ["evaluate", art, "--runs", "1", "--epochs", "1"]


def _artifact_names_a_deep_cifar_root(p, tmp):
    art = rewrite_artifact_manifest(p["art"], tmp / "a.safetensors", lambda m: m["dataset"].update(
        name="cifar10", data_root=str(tmp / "some" / "deep" / "dir"), image_shape=[3, 32, 32]))
    return ["export", art, "--format", "ddranking", "--full-train-zca", "--out", tmp / "dd"]


def _full_data_without_dataset(p, tmp):
    return ["evaluate", "--full-data"]


def _damaged_checkpoint(p, tmp):
    (tmp / "run").mkdir()
    (tmp / "run" / "checkpoint.pt").write_bytes(b"not a checkpoint" * 20)
    return _distill(p["experts"], tmp / "run")


def _damaged_preprocessing_state(p, tmp):
    experts = tmp / "e"
    shutil.copytree(p["experts"], experts)
    (experts / "preprocess.safetensors").write_bytes(os.urandom(64))
    return _distill(experts, tmp / "run")


CASES = {
    "out is an existing file (export)": (_out_is_a_file_export, ["is an existing file", "folder"]),
    "out is an existing file (distill)": (_out_is_a_file_distill, ["is an existing file", "folder"]),
    "experts manifest is a JSON list": (_manifest_is_a_list, ["manifest.json", "list", "expected an object"]),
    "2 class names for 10 classes (experts)": (_two_class_names, ["dataset.class_names", "2 names for 10 classes"]),
    "2 class names for 10 classes (artifact)": (_artifact_two_class_names, ["dataset.class_names", "2 names"]),
    "epochs: four": (_epochs_is_a_word, ["manifest.json", "'epochs'", "'four'", "integer"]),
    "manifest claims 3 classes for 10-class experts": (_claims_three_classes, ["says 3 classes", "[10] outputs"]),
    "experts from another dataset": (_experts_from_another_dataset, ["[1, 8, 8]", "[3, 8, 8]", "made from"]),
    "expert file from another width": (_width_mismatch, ["[7, 12]", "different runs", "retrain"]),
    "random bytes as .npz": (_random_bytes_npz, ["not an .npz archive"]),
    "training labels 5..7": (_labels_five_to_seven, ["classes 0-4", "no training image", "renumber"]),
    "--experts art.safetensors": (_artifact_as_experts, ["is a file", "mttlss experts --out DIR"]),
    "unknown --set key": (_unknown_key, ["unknown config key 'lr_imgs'", "valid keys"]),
    "artifact names an npz path": (_artifact_names_an_npz_path, ["expects dataset", "pass --dataset npz:"]),
    "artifact names a deep cifar10 root": (_artifact_names_a_deep_cifar_root, ["expects dataset 'cifar10'", "--data-root"]),
    "--full-data without --dataset": (_full_data_without_dataset, ["--full-data needs --dataset"]),
    "damaged checkpoint": (_damaged_checkpoint, ["checkpoint.pt is damaged", "delete it"]),
    "damaged preprocessing state": (_damaged_preprocessing_state, ["preprocess.safetensors is missing or damaged"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(case, protected, tmp_path):
    setup, words = CASES[case]
    before = tree_digest(protected["root"])
    argv = setup(protected, tmp_path)
    proc = run_cli(*argv, env={"MTTLSS_DATA": str(tmp_path / "no-data-here")})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("mttlss ")]
    assert len(lines) == 1 and ": error: " in lines[0], proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    # no advice to unpickle (numpy's allow_pickle, torch's weights_only=False), no KeyError quotes
    assert "allow_pickle" not in proc.stderr and "weights_only" not in proc.stderr and ": error: '" not in proc.stderr
    assert tree_digest(protected["root"]) == before
    assert not (tmp_path / "some").exists() and not (tmp_path / "elsewhere").exists()  # nothing created, downloaded
    assert not (tmp_path / "no-data-here").exists()


def test_long_class_names_export_to_folders_a_file_system_accepts(protected, tmp_path):
    names = [f"{i}" + "x" * 300 for i in range(10)]
    art = rewrite_artifact_manifest(protected["art"], tmp_path / "a.safetensors",
                                    lambda m: m["dataset"].update(class_names=names))
    assert cli.main(["export", str(art), "--format", "imagefolder", "--out", str(tmp_path / "png")]) == 0
    folders = sorted(p.name for p in (tmp_path / "png").iterdir() if p.is_dir())
    assert len(folders) == 10 and all(len(f.encode()) <= 255 for f in folders)


def test_internal_error_shows_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_presets", broken)
    args = cli.build_parser().parse_args(["presets"])
    args.func = broken
    assert cli.run_command(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err and "please report it" in err


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["info", str(tmp_path / "empty")]
    assert cli.main(argv) == 2 and "Traceback" not in capsys.readouterr().err
    with pytest.raises(mttlss.experts.ExpertError, match="manifest.json missing"):
        cli.main([*argv, "--debug"])
    proc = run_cli(*argv, env={"MTTLSS_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ExpertError" in proc.stderr


def test_out_of_memory_is_a_sentence_not_a_bug(capsys):
    import torch

    def oom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    args = cli.build_parser().parse_args(["presets"])
    args.func = oom
    assert cli.run_command(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "out of memory (CUDA out of memory" in err and "memory=checkpoint" in err
