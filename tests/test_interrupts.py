"""Ctrl-C, a full disk and shared folders lose nothing: each command stops with a sentence, keeps what it finished,
and a rerun says what it resumed."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mttlss
from mttlss import cli, io_utils, training
from mttlss.errors import DiskFullError
from mttlss.evaluate import evaluate_artifact
from mttlss.io_utils import StopRequest, atomic_save_safetensors, atomic_torch_save, atomic_write_text, finish_before_interrupt

SRC = Path(mttlss.__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != "MTTLSS_DEBUG"}, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
       "MKL_NUM_THREADS": "1"}
INTERRUPTED = "interrupted; rerun the same command to resume"


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mttlss", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def interrupt_when(proc: subprocess.Popen, ready, *, timeout: float = 90.0) -> tuple[int, str, str]:
    """Send SIGINT once ``ready()`` holds; the exit code and output."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the command ended (or hung) before the moment to interrupt it: {proc.returncode}\n{err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=90)
    return proc.returncode, out, err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C in a subprocess


DISTILL_SETS = ["syn_steps=3", "max_start_epoch=3", "current_max_start_epoch=2", "expansion_end_epoch=4", "eval_every=0",
                "select_on=none", "grid_every=0", "checkpoint_every=1000", "min_start_epoch=0", "labels=hard", "init=real"]


def _distill_argv(experts, out, iterations):
    argv = ["distill", "--experts", str(experts), "--ipc", "1", "--param", "pixel", "--out", str(out),
            "--set", f"iterations={iterations}"]
    for item in DISTILL_SETS:
        argv += ["--set", item]
    return argv


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_ctrl_c_in_distill_checkpoints_the_last_iteration_and_a_rerun_says_it_resumes(experts_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = interrupt_when(start(*_distill_argv(experts_dir, out, 5000)), lambda: _lines(out / "log.jsonl") >= 2)
    assert code == 130 and INTERRUPTED in err and "Traceback" not in err, err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] >= 2 and ckpt["iteration"] == _lines(out / "log.jsonl")  # not iteration 0: the last one
    assert not list(out.glob(".*.tmp"))

    capsys.readouterr()
    assert cli.main(_distill_argv(experts_dir, out, ckpt["iteration"] + 1)) == 0  # the rerun, in-process to save time
    assert f"resuming {out} from its checkpoint at iteration {ckpt['iteration']}" in capsys.readouterr().err
    assert (out / "synthetic.safetensors").exists()


def test_ctrl_c_in_experts_keeps_whole_files_and_a_rerun_says_what_it_kept(tmp_path, capsys):
    out = tmp_path / "ex"
    argv = ["experts", "--dataset", "digits", "--width", "16", "--depth", "2", "--epochs", "4", "--batch-size", "128",
            "--out", out]
    code, _, err = interrupt_when(start(*argv, "--num-experts", "40"), lambda: (out / "expert_000.safetensors").exists())
    assert code == 130 and INTERRUPTED in err and "Traceback" not in err, err
    files = sorted(out.glob("expert_*.safetensors"))
    assert files and not list(out.glob(".*.tmp"))
    for f in files:  # every file there is whole
        with safe_open(str(f), framework="pt") as fh:
            assert fh.get_slice("trajectory").get_shape()[0] == 5

    capsys.readouterr()
    assert cli.main([*map(str, argv), "--num-experts", "1"]) == 0  # the rerun, in-process to save time
    assert f"experts: resuming {out}: kept {len(files)} finished experts; none missing" in capsys.readouterr().err


def test_ctrl_c_in_evaluate_keeps_finished_networks_and_the_rerun_reports_the_same_numbers(experts_dir, tmp_path, capsys):
    art, copy = tmp_path / "a" / "art.safetensors", tmp_path / "b" / "art.safetensors"
    for path in (art, copy):
        assert cli.main(["random", "--dataset", "digits", "--ipc", "1", "--experts", str(experts_dir), "--out", str(path)]) == 0
    evals = art.with_name(art.name + ".evaluations")
    flags = ["--recipe", "quick-100", "--epochs", "10"]
    code, _, err = interrupt_when(start("evaluate", art, "--runs", "300", *flags),
                                  lambda: any(evals.glob("*/seed_1.json")))
    assert code == 130 and INTERRUPTED in err and "Traceback" not in err, err

    capsys.readouterr()  # the rerun and an uninterrupted run, in-process to save time
    for path, name in ((art, "resumed"), (copy, "fresh")):
        assert cli.main(["evaluate", str(path), "--runs", "3", *flags, "--json", str(tmp_path / f"{name}.json")]) == 0
        err = capsys.readouterr().err
        assert ("evaluate: resuming: kept " in err) == (name == "resumed"), err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("resumed", "fresh"))
    assert a["accs"] == b["accs"] and a["mean"] == b["mean"]


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C in-process: a file being written is finished first


def _torch_loading(pid: int) -> bool:
    """Whether process ``pid`` has begun to load torch's shared libraries (Linux: its memory map names them)."""
    try:
        return "libc10" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc to see the import begin")
def test_ctrl_c_while_python_imports_torch_gets_the_sentence_not_a_signal_death(tmp_path):
    """The launcher imports only the standard library before its try: a SIGINT sent as soon as torch starts to load
    (about 2 s of imports on a CPU follow) must still end in the sentence and exit 130, not a death by the signal."""
    proc = start("experts", "--dataset", "digits", "--width", "8", "--depth", "1", "--num-experts", "1", "--epochs", "1",
                 "--out", tmp_path / "ex")
    code, _, err = interrupt_when(proc, lambda: _torch_loading(proc.pid))
    assert code == 130 and INTERRUPTED in err and "Traceback" not in err, (code, err)


def test_the_launcher_turns_ctrl_c_before_the_command_into_the_sentence(monkeypatch, capsys):
    from mttlss import __main__ as launcher

    def interrupted_import(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted_import)
    assert launcher.main(["experts", "--dataset", "digits"]) == 130
    assert INTERRUPTED in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # --debug shows where it was
        launcher.main(["--debug", "experts"])


def test_after_the_command_the_launcher_ignores_ctrl_c_while_python_shuts_down(monkeypatch):
    """Python restores the default SIGINT action at shut-down, so a late Ctrl-C killed a finished run (exit -2)."""
    from mttlss import __main__ as launcher

    monkeypatch.setattr(launcher, "main", lambda: 0)
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as done:
            launcher.run()
        assert done.value.code == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_an_interrupted_command_leaves_with_exit_130_whatever_python_thinks(monkeypatch):
    """After the sentence, the launcher exits 130 at once (os._exit): CPython otherwise re-raised SIGINT at exit in
    3 of 60 interrupted runs, turning a handled Ctrl-C into a death by the signal (exit -2)."""
    from mttlss import __main__ as launcher

    exits = []
    monkeypatch.setattr(launcher, "main", lambda: 130)
    monkeypatch.setattr(launcher.os, "_exit", lambda code: exits.append(code))
    before = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # the patched os._exit returns, so sys.exit follows
            launcher.run()
    finally:
        signal.signal(signal.SIGINT, before)
    assert exits == [130]


def test_a_file_being_written_is_finished_before_ctrl_c_stops(tmp_path):
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with finish_before_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes: give it some
                pass
            atomic_write_text(tmp_path / "f.txt", "whole")
            reached = True
    assert reached and (tmp_path / "f.txt").read_text() == "whole"


def test_stop_request_first_ctrl_c_asks_second_stops(capsys):
    with StopRequest(message="finishing this step") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    assert "finishing this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------------------------------------
# a full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_names_the_folder_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "t.safetensors"
    atomic_save_safetensors(path, {"x": torch.zeros(3)})
    before = sha(path)
    monkeypatch.setattr(io_utils, "save_file", _no_space)
    with pytest.raises(DiskFullError) as info:
        atomic_save_safetensors(path, {"x": torch.ones(3)})
    assert str(path.parent) in str(info.value) and "intact" in str(info.value)
    assert sha(path) == before and [p.name for p in path.parent.iterdir()] == ["t.safetensors"]


def test_torch_saves_short_write_is_called_a_full_disk(tmp_path, monkeypatch):
    def short_write(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7296 vs 7184")

    monkeypatch.setattr(io_utils.torch, "save", short_write)
    with pytest.raises(DiskFullError, match="is full"):
        atomic_torch_save(tmp_path / "checkpoint.pt", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_evaluate_prints_its_accuracies_before_a_record_that_hits_a_full_disk(experts_dir, tmp_path, monkeypatch, capsys):
    art = tmp_path / "art.safetensors"
    assert cli.main(["random", "--dataset", "digits", "--ipc", "1", "--experts", str(experts_dir), "--out", str(art)]) == 0
    before = sha(art)

    def storage_full(*args, **kwargs):  # what safetensors raises
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(io_utils, "save_file", storage_full)
    capsys.readouterr()
    code = cli.main(["evaluate", str(art), "--runs", "1", "--epochs", "3", "--record"])
    out, err = capsys.readouterr()
    assert code == 2 and "test acc" in out
    assert f"the disk holding {tmp_path} is full" in err and "intact" in err and "Traceback" not in err
    assert sha(art) == before


def test_experts_on_a_full_disk_keep_what_they_finished(tmp_path, monkeypatch, capsys):
    calls = []
    real = io_utils.save_file

    def full_after_two(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 2:  # preprocess state and expert 0 fit; expert 1 does not
            _no_space()
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io_utils, "save_file", full_after_two)
    out = tmp_path / "ex"
    code = cli.main(["experts", "--dataset", "digits", "--width", "8", "--depth", "1", "--num-experts", "2",
                     "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"the disk holding {out} is full" in err and "Traceback" not in err
    assert [p.name for p in sorted(out.glob("expert_*"))] == ["expert_000.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# files others can read; evaluation resumes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_files_get_the_umasks_ordinary_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        paths = [atomic_write_text(tmp_path / "a.txt", "x"), atomic_save_safetensors(tmp_path / "b.safetensors",
                                                                                     {"x": torch.zeros(1)})]
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in paths] == [mode, mode]


def test_evaluation_resumes_training_only_the_missing_networks(experts_dir, tmp_path, monkeypatch, capsys):
    art = tmp_path / "art.safetensors"
    assert cli.main(["random", "--dataset", "digits", "--ipc", "1", "--experts", str(experts_dir), "--out", str(art)]) == 0
    trained = []
    real = training.train_and_test

    def counting(**job):
        trained.append(job["seed"])
        return real(**job)

    monkeypatch.setattr(training, "train_and_test", counting)
    kw = dict(runs=3, recipe="quick-100", epochs=5, device="cpu", resume=True)
    first = evaluate_artifact(art, **kw)
    assert trained == [0, 1, 2]
    kept = next(art.with_name(art.name + ".evaluations").glob("*"))
    (kept / "seed_1.json").unlink()  # as if a kill had come while network 1 trained
    capsys.readouterr()
    again = evaluate_artifact(art, **kw)
    assert trained == [0, 1, 2, 1] and again["accs"] == first["accs"]
    assert "kept 2 of 3 finished networks (seeds [0, 2])" in capsys.readouterr().err
    other = evaluate_artifact(art, **{**kw, "epochs": 6})  # another recipe: nothing of the first is reused
    assert trained[4:] == [0, 1, 2] and len(other["accs"]) == 3


def test_evaluate_no_resume_neither_keeps_nor_reuses(experts_dir, tmp_path, capsys):
    art = tmp_path / "art.safetensors"
    assert cli.main(["random", "--dataset", "digits", "--ipc", "1", "--experts", str(experts_dir), "--out", str(art)]) == 0
    flags = ["evaluate", str(art), "--runs", "1", "--recipe", "quick-100", "--epochs", "2"]
    assert cli.main(flags) == 0 and art.with_name(art.name + ".evaluations").is_dir()
    capsys.readouterr()
    assert cli.main([*flags, "--no-resume"]) == 0
    assert "resuming" not in capsys.readouterr().err
    shutil.rmtree(art.with_name(art.name + ".evaluations"))
    assert cli.main([*flags, "--no-resume"]) == 0 and not art.with_name(art.name + ".evaluations").exists()
