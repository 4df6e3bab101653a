"""The code base stays lint-clean, type-clean, and keeps its dependency rules.

- ruff everywhere;
- mypy on the runtime, the guest and the client package (the gateway is not type-clean
  yet: ``mypy gateway`` still reports errors, so it is not enforced here; add it to
  ``TYPED`` once it passes);
- the import contracts of ``[tool.importlinter]`` in pyproject.toml (import-linter), one
  test per contract, so a broken rule names itself. The client (``client/vmkg_client``)
  is a root package there; where client/ does not exist, its contract is skipped and the
  others are checked without it.

These run in the fast lane (no VM).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
#: where each root package lives (the client is a distribution of its own, in client/)
SEARCH = (ROOT, ROOT / "client")
TYPED = ("kernelmanager", "guest", "vmkg_client")


def package_dir(name: str) -> Path | None:
    for base in SEARCH:
        if (base / name / "__init__.py").is_file():
            return base
    return None


def test_ruff() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_runtime_guest_and_client() -> None:
    packages = [str((base / p).relative_to(ROOT)) for p in TYPED if (base := package_dir(p)) is not None]
    out = subprocess.run([sys.executable, "-m", "mypy", *packages], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- import contracts --------------------------------------------------------------------------


def importlinter_settings() -> dict[str, Any]:
    settings: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return settings


CONTRACTS = [c["id"] for c in importlinter_settings()["contracts"]]


def _ini_value(value: Any) -> str:
    if isinstance(value, list):
        return "".join(f"\n    {v}" for v in value)
    return f" {value}"


def write_config(dest: Path) -> list[str]:
    """pyproject's import-linter settings as an INI file, without the root packages that do
    not exist in this checkout (and without the contracts about them). Returns the ids of
    the contracts kept."""
    settings = importlinter_settings()
    missing = {p for p in settings["root_packages"] if package_dir(p) is None}
    lines = ["[importlinter]"]
    for key, value in settings.items():
        if key == "contracts":
            continue
        if key == "root_packages":
            value = [p for p in value if p not in missing]
        lines.append(f"{key} ={_ini_value(value)}")
    kept = []
    for contract in settings["contracts"]:
        if {m.split(".")[0] for m in contract["source_modules"]} <= missing:
            continue
        lines.append(f"\n[importlinter:contract:{contract['id']}]")
        for key, value in contract.items():
            if key == "id":
                continue
            if key == "forbidden_modules":
                value = [m for m in value if m.split(".")[0] not in missing]
            lines.append(f"{key} ={_ini_value(value)}")
        kept.append(contract["id"])
    dest.write_text("\n".join(lines) + "\n")
    return kept


@pytest.fixture(scope="module")
def lint_imports(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """One import-linter run over every contract that applies: (the ids checked, its report)."""
    config = tmp_path_factory.mktemp("importlinter") / "importlinter.ini"
    kept = write_config(config)
    env_path = [str(p) for p in SEARCH if p.is_dir()]
    out = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         "--no-logo", "--no-cache", str(config)],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(env_path), "COLUMNS": "1000"})
    assert "Contracts:" in out.stdout, out.stdout + out.stderr  # it ran (a config error does not)
    return kept, out.stdout + out.stderr


@pytest.mark.parametrize("contract", CONTRACTS)
def test_import_contract(contract: str, lint_imports: tuple[list[str], str]) -> None:
    kept, report = lint_imports
    if contract not in kept:
        pytest.skip(f"contract {contract!r}: its package is not in this checkout")
    name = next(c["name"] for c in importlinter_settings()["contracts"] if c["id"] == contract)
    verdicts = [line.removeprefix(name).split()[0] for line in report.splitlines() if line.startswith(name + " ")]
    assert verdicts and verdicts[0] in ("KEPT", "BROKEN"), report
    assert verdicts[0] == "KEPT", report


def test_contract_config_drops_only_missing_packages(tmp_path: Path) -> None:
    """The INI written for import-linter keeps every contract whose package exists."""
    kept = write_config(tmp_path / "c.ini")
    expected = [c["id"] for c in importlinter_settings()["contracts"]
                if package_dir(c["source_modules"][0].split(".")[0]) is not None]
    assert kept == expected and {"guest", "kernelmanager", "gateway"} <= set(kept)
