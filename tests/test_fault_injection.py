"""The fast subset of scripts/fault_injection.py: experts killed at random moments, rerun, compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fault_injection.py"


def test_killed_experts_complete_identically_on_rerun(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--kills", "2", "--commands", "experts", "--seed", "3",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "faults.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "faults.json").read_text())["summary"][0]
    assert summary["command"] == "experts" and summary["runs"] == 2
    assert summary["completed"] == summary["identical"] == 2 and summary["different"] == 0
    assert summary["half_written"] == 0
