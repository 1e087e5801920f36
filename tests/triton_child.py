"""Triton's CPU interpreter for the kernel tests: a test file's `_check()` runs in a child process with
TRITON_INTERPRET=1 (it must be set before triton is imported), which prints its results as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_check(test_file: str, timeout: float) -> dict:
    """Run `python test_file` under the interpreter; its last stdout line, parsed."""
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, test_file], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
