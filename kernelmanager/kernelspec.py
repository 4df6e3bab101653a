"""Kernelspecs that select the microVM provisioner: one per template.

``python3-microvm`` restores from the built-in ``python3`` template; a template named
``data`` gets ``data-microvm``. The ``argv`` is never executed (the provisioner
restores a VM instead of starting a process) but Jupyter requires one.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager

from .templates import TemplateSpec, catalog, get_spec


def kernelspec_name(template: str) -> str:
    return f"{template}-microvm"


def kernelspec_json(spec: TemplateSpec) -> dict[str, Any]:
    return {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": spec.display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "env": {},
        "metadata": {
            "kernel_provisioner": {"provisioner_name": "microvm", "config": {"template": spec.name}},
            "vmkg": {"template": spec.name, "memory_mb": spec.memory_mb, "vcpus": spec.vcpus,
                     "network": spec.network},
        },
    }


def install(template: str | None = None, *, user: bool = False, prefix: str | None = None) -> list[str]:
    """Install kernelspecs (all templates, or one); returns the directories written."""
    chosen = [get_spec(template)] if template else list(catalog().values())  # ConfigError if unknown
    ksm = KernelSpecManager()
    written = []
    for spec in chosen:
        with tempfile.TemporaryDirectory() as td:
            (Path(td) / "kernel.json").write_text(json.dumps(kernelspec_json(spec), indent=1))
            written.append(ksm.install_kernel_spec(td, kernelspec_name(spec.name), user=user,
                                                   prefix=prefix, replace=True))
    return written
