"""Kill mttlss at random moments, rerun, and check that nothing is lost: the reliability check of issue 14.

For each command (experts, distill, evaluate) on a small digits problem it makes one uninterrupted reference run,
then, ``--kills`` times, starts the same command in a fresh folder, sends SIGKILL or SIGINT at a moment drawn
uniformly over the reference run's duration (so some land before the first file, some after; a SIGINT is drawn
after the bare interpreter's start-up time, measured first: before that no mttlss code runs, and Python itself
answers a Ctrl-C there with a fatal error or a death by the signal), checks the files
left behind, reruns the command to completion and compares its result with the reference:

    python scripts/fault_injection.py --kills 20 --out scripts/results/fault_injection.json   # the full run (~20-30 min on 2 cores)
    python scripts/fault_injection.py --kills 1 --commands experts                           # a smoke test

Printed per command: runs / completed (the rerun exited 0) / identical (bit for bit: the expert files, the
artifact's tensors, the evaluation accuracies) / different / half-written (a file at its final name that does not
read back) / temp files left (a SIGKILL mid-write leaves its hidden ``.*.tmp``; harmless, never read), and for
SIGINT the exit codes seen: 130 with the sentence while the command runs, 0 when it landed after the command had
finished (while Python shut down), never a death by the signal itself (a negative code; counted, and a failure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
EXPERTS = ["--dataset", "digits", "--width", "8", "--depth", "1", "--num-experts", "3", "--epochs", "4",
           "--batch-size", "128"]
DISTILL_SETS = ["iterations=16", "syn_steps=3", "max_start_epoch=2", "current_max_start_epoch=2", "expansion_end_epoch=4",
                "eval_every=8", "eval_epochs=5", "eval_runs=1", "select_on=val", "grid_every=0", "checkpoint_every=3",
                "min_start_epoch=0", "labels=hard", "init=real"]
EVALUATE = ["--runs", "4", "--recipe", "quick-100", "--epochs", "20"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MTTLSS_DEBUG"}
    env.update(PYTHONPATH=str(SRC), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def _cli(*argv) -> list[str]:
    return [sys.executable, "-m", "mttlss", *map(str, argv)]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=600)


# ---------------------------------------------------------------------------------------------------------
# what each command's result is, and how a file left behind is read back


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor_digest(path: Path) -> dict[str, str]:
    from safetensors import safe_open  # here: the parent process imports torch only when it compares tensors

    with safe_open(str(path), framework="pt") as f:
        return {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest() for k in f.keys()}


def _reads_back(path: Path) -> bool:
    try:
        if path.suffix == ".safetensors":
            _tensor_digest(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            import torch  # here for the same reason as in _tensor_digest

            torch.load(path, weights_only=True)
        elif path.suffix == ".jsonl":  # appended per record: only its last line may be torn, and a resume drops it
            [json.loads(line) for line in path.read_text().splitlines()[:-1]]
        return True
    except Exception:
        return False


def _scan(folder: Path) -> tuple[int, int]:
    """(half-written files, temp files left) under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    temps = [p for p in files if p.name.startswith(".") and p.name.endswith(".tmp")]
    broken = [p for p in files if p not in temps and not _reads_back(p)]
    return len(broken), len(temps)


class Command:
    """One command of the pipeline: its argv in a folder, and its result to compare."""

    def __init__(self, name: str, *, argv, result, output):
        self.name, self.argv, self.result, self.output = name, argv, result, output


def _commands(work: Path) -> dict[str, Command]:
    ref_experts = work / "reference" / "experts"

    def experts_result(folder: Path):
        return {p.name: _sha(p) for p in sorted((folder / "ex").glob("*")) if p.is_file() and not p.name.startswith(".")}

    def distill_argv(folder: Path):
        argv = ["distill", "--experts", ref_experts, "--ipc", "1", "--param", "pixel", "--out", folder / "run"]
        for item in DISTILL_SETS:
            argv += ["--set", item]
        return argv

    def evaluate_argv(folder: Path):
        art = folder / "art.safetensors"
        if not art.exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "reference" / "art.safetensors", art)
        return ["evaluate", art, *EVALUATE, "--json", folder / "result.json"]

    return {
        "experts": Command("experts", argv=lambda f: ["experts", *EXPERTS, "--out", f / "ex"], result=experts_result,
                           output=lambda f: f / "ex"),
        "distill": Command("distill", argv=distill_argv, result=lambda f: _tensor_digest(f / "run" / "synthetic.safetensors"),
                           output=lambda f: f / "run"),
        "evaluate": Command("evaluate", argv=evaluate_argv,
                            result=lambda f: json.loads((f / "result.json").read_text())["accs"], output=lambda f: f),
    }


# ---------------------------------------------------------------------------------------------------------
# the runs


def _prepare(work: Path, names: list[str]) -> None:
    """The experts distill reads and the artifact evaluate tests (made once, never interrupted), when needed."""
    ref = work / "reference"
    steps = [["experts", *EXPERTS, "--out", ref / "experts"],
             ["random", "--dataset", "digits", "--ipc", "1", "--experts", ref / "experts", "--out", ref / "art.safetensors"]]
    for argv in steps[: 2 if "evaluate" in names else 1 if "distill" in names else 0]:
        proc = _run(_cli(*argv))
        if proc.returncode != 0:
            sys.exit(f"preparing {argv[0]} failed:\n{proc.stderr}")


def _startup_seconds() -> float:
    """Median wall time of a bare ``python -c pass`` in the runs' environment (site imports included)."""
    times = []
    for _ in range(3):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "pass"], env=_env(), check=True)
        times.append(time.time() - t0)
    return sorted(times)[1]


def _reference(cmd: Command, work: Path) -> tuple[object, float]:
    folder = work / cmd.name / "reference"
    t0 = time.time()
    proc = _run(_cli(*cmd.argv(folder)))
    if proc.returncode != 0:
        sys.exit(f"the reference {cmd.name} run failed:\n{proc.stderr}")
    return cmd.result(folder), time.time() - t0


def _kill_and_rerun(cmd: Command, folder: Path, *, delay: float, sig: int) -> dict:
    proc = subprocess.Popen(_cli(*cmd.argv(folder)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        proc.wait(timeout=delay)
        killed = False  # it finished before the moment came
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        killed = True
    _, err = proc.communicate(timeout=300)
    half, temps = _scan(cmd.output(folder))
    rerun = _run(_cli(*cmd.argv(folder)))
    return {"signal": signal.Signals(sig).name, "delay_s": round(delay, 2), "killed": killed,
            "exit_code": proc.returncode, "interrupt_message": "rerun the same command to resume" in err,
            "half_written": half, "temp_files_left": temps, "rerun_exit_code": rerun.returncode,
            "rerun_said_resumed": "resuming" in rerun.stderr, "rerun_stderr_tail": rerun.stderr[-400:]}


def _summary(name: str, rows: list[dict]) -> dict:
    done = [r for r in rows if r["rerun_exit_code"] == 0]
    ints = [r for r in rows if r["signal"] == "SIGINT" and r["killed"]]
    return {"command": name, "runs": len(rows), "killed": sum(r["killed"] for r in rows), "completed": len(done),
            "identical": sum(r["identical"] for r in done), "different": sum(not r["identical"] for r in done),
            "half_written": sum(r["half_written"] for r in rows), "temp_files_left": sum(r["temp_files_left"] for r in rows),
            "sigint_exit_codes": sorted({r["exit_code"] for r in ints}),
            "sigint_said_rerun": sum(r["interrupt_message"] for r in ints),
            "sigint_after_finish": sum(r["exit_code"] == 0 for r in ints),
            "sigint_ended_by_signal": sum(r["exit_code"] < 0 for r in ints)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20, help="interruptions per command")
    p.add_argument("--commands", default="experts,distill,evaluate")
    p.add_argument("--signals", default="KILL,INT", help="drawn at random per interruption: KILL, INT or both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="a folder for the runs (default: a temporary one, removed after)")
    p.add_argument("--out", default=None, help="write the per-run records and the summary to this JSON file")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    signals = [getattr(signal, f"SIG{s.strip().upper()}") for s in args.signals.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mttlss-faults-"))
    try:
        names = [n.strip() for n in args.commands.split(",")]
        _prepare(work, names)
        commands = _commands(work)
        startup = _startup_seconds()
        report = {"kills_per_command": args.kills, "seed": args.seed, "python_startup_seconds": round(startup, 3),
                  "summary": [], "runs": {}}
        for name in names:
            cmd = commands[name]
            expected, seconds = _reference(cmd, work)
            rows = []
            for i in range(args.kills):
                folder = work / cmd.name / f"kill_{i:03d}"
                sig = rng.choice(signals)
                delay = rng.uniform(startup if sig == signal.SIGINT else 0.0, 1.1 * seconds)
                row = _kill_and_rerun(cmd, folder, delay=delay, sig=sig)
                row["identical"] = row["rerun_exit_code"] == 0 and cmd.result(folder) == expected
                rows.append(row)
            report["runs"][cmd.name] = rows
            report["summary"].append({**_summary(cmd.name, rows), "reference_seconds": round(seconds, 1)})
            print(json.dumps(report["summary"][-1]), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        bad = any(s["completed"] < s["runs"] or s["different"] or s["half_written"] or s["sigint_ended_by_signal"]
                  for s in report["summary"])
        return 1 if bad else 0
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
