"""Shared by the benchmarks: kernelspecs visible to this process only, percentiles."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def ensure_kernelspecs() -> None:
    """Make the microVM kernelspecs visible without a system-wide install."""
    from kernelmanager.kernelspec import kernelspec_json, kernelspec_name
    from kernelmanager.templates import catalog

    root = Path(tempfile.mkdtemp(prefix="vmkg-bench-jupyter-"))
    for spec in catalog().values():
        d = root / "kernels" / kernelspec_name(spec.name)
        d.mkdir(parents=True)
        (d / "kernel.json").write_text(json.dumps(kernelspec_json(spec)))
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")]))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
