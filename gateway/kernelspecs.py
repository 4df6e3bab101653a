"""The kernelspecs the gateway serves: one per template of the catalog, nothing else.

``vmkg serve`` needs no ``vmkg kernelspec install``: at start it writes one kernelspec
directory per template (``python3-microvm``, ``data-microvm``, ...) into a directory of
its own, with the ipykernel logos as resources, and serves only those. Kernels started
from them are restored microVMs (the spec selects the ``microvm`` provisioner); the
host's own kernelspecs, which would start local processes, are never offered.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from traitlets import Unicode

from kernelmanager import catalog, kernelspec_json, kernelspec_name


def write_kernelspecs(root: Path) -> list[str]:
    """Write one kernelspec per template under ``root``; returns their names."""
    logos: list[Path] = []
    try:
        from ipykernel.kernelspec import RESOURCES

        logos = sorted(Path(RESOURCES).glob("logo-*"))
    except ImportError:  # pragma: no cover - ipykernel is a dependency
        pass
    names = []
    for spec in catalog().values():
        name = kernelspec_name(spec.name)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "kernel.json").write_text(json.dumps(kernelspec_json(spec), indent=1))
        for logo in logos:
            shutil.copyfile(logo, d / logo.name)
        names.append(name)
    return names


class TemplateKernelSpecManager(KernelSpecManager):
    """A KernelSpecManager that sees only the gateway's template kernelspecs.

    Created by ``vmkg serve``; ``close()`` removes the directory it wrote.
    """

    specs_dir = Unicode("", config=True,
                        help="Directory to write the template kernelspecs into (default: a new "
                             "temporary directory, removed at shutdown).")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owned = not self.specs_dir
        root = Path(self.specs_dir or tempfile.mkdtemp(prefix="vmkg-kernelspecs-"))
        self.names = write_kernelspecs(root)
        self._root = root
        self.kernel_dirs = [str(root)]
        self.ensure_native_kernel = False

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        # jupyter_client falls back to ipykernel's own 'python3' (a local process) even when
        # ensure_native_kernel is off; this gateway starts nothing but its templates
        if kernel_name not in self.names:
            raise NoSuchKernel(kernel_name)
        return super().get_kernel_spec(kernel_name)

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self._root, ignore_errors=True)
