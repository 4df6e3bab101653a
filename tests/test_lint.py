"""The code base stays lint-clean (ruff everywhere) and type-clean (mypy on the runtime
and the guest; the gateway's types are checked by hand but not yet enforced here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_runtime_and_guest() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy", "kernelmanager", "guest"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
