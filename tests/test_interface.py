"""kernelmanager's declared interface: what it names, and that the gateway uses nothing else.

Fast (no VM): it reads the sources. The import-linter contracts say the same for whole
packages; this pins the names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kernelmanager

REPO = Path(__file__).resolve().parents[1]
HIDDEN = {"VMKernel", "QemuVM", "Snapshot", "Runtime", "KernelRelay", "AgentChannel"}


def imported_modules(package: str) -> dict[str, set[str]]:
    """file -> absolute module names it imports (relative imports left out)."""
    out: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
        out[str(path.relative_to(REPO))] = names
    return out


def test_the_interface_names_resolve_and_hide_the_vm_objects() -> None:
    for name in kernelmanager.__all__:
        assert hasattr(kernelmanager, name), name
    assert not HIDDEN & set(kernelmanager.__all__)
    for name in ("MicroVMProvisioner", "vm_handle", "VMHandle", "fork", "ForkSource", "Lineage",
                 "catalog", "bake_template", "start_runtime", "stop_runtime", "build_image",
                 "detect_accelerator", "install_kernelspecs", "prune_cache", "ForkError"):
        assert name in kernelmanager.__all__, name


def test_gateway_imports_only_the_root_and_the_exceptions() -> None:
    for path, names in imported_modules("gateway").items():
        used = {n for n in names if n.split(".")[0] in ("kernelmanager", "guest")}
        assert used <= {"kernelmanager", "kernelmanager.exceptions"}, (path, used)


def test_guest_and_kernelmanager_stay_below_the_gateway() -> None:
    for path, names in imported_modules("guest").items():
        assert not {n for n in names if n.split(".")[0] in ("kernelmanager", "gateway")}, path
    for path, names in imported_modules("kernelmanager").items():
        bad = {n for n in names if n.split(".")[0] in ("gateway", "tornado", "jupyter_server")}
        assert not bad, (path, bad)


def test_no_image_builder_in_guest() -> None:
    assert not (REPO / "guest" / "image").exists()
    assert (REPO / "kernelmanager" / "image" / "build.py").is_file()
