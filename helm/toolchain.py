"""The Helm toolchain the chart's tests render with: a venv of its own, outside the repo.

``helm-sdkpy`` (Helm's Go library, bundled, behind Python bindings) needs Python >= 3.12,
newer than the project's venv may be, so the chart's tests run ``helm/render.py`` in a
separate venv holding the pins of the ``helm`` extra in pyproject.toml (helm-sdkpy and
kubernetes-validate, with markers that keep them out of older Pythons).

Where: ``<cache>/helm/venv-<key>``, the cache being the one the guest image uses
($VMKG_CACHE_DIR, else /var/cache/vmkg as root, else ~/.cache/vmkg; the same rule as
``kernelmanager.paths.cache_dir``), the key a hash of the pins and the interpreter's
version, so a pin bump makes a new venv and an existing one is reused as is. It is
built in a temporary directory and renamed into place, so a half-made venv is never used.

Which Python: ``$VMKG_HELM_PYTHON``, else the first interpreter >= 3.12 found among
``python3.13``/``python3.12`` on PATH, pyenv's versions ($PYENV_ROOT or ~/.pyenv; the
machines this project runs on ship 3.12 there) and /usr/bin, /usr/local/bin. Debian 12
has no Python 3.12 package, so without one of these there is no toolchain: ``ensure``
raises ``Unavailable`` saying so (the tests then skip).

Stdlib only: ./vmkg-dev runs ``python helm/toolchain.py`` with the project's venv, and
tests/test_helm.py imports ``ensure``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kernelmanager.paths import cache_dir

ROOT = Path(__file__).resolve().parent.parent
MIN_PYTHON = (3, 12)


class Unavailable(RuntimeError):
    """The toolchain cannot be set up here (the message says why)."""


def pins(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The ``helm`` extra of pyproject.toml, markers stripped (the venv's Python meets them)."""
    text = pyproject.read_text()
    try:
        import tomllib
        reqs = tomllib.loads(text)["project"]["optional-dependencies"]["helm"]
    except ImportError:  # Python 3.10: the list is simple enough for a pattern
        m = re.search(r"^helm\s*=\s*\[(.*?)\]", text, re.M | re.S)
        if m is None:
            raise Unavailable("pyproject.toml has no `helm` extra") from None
        reqs = re.findall(r'"([^"]+)"', m.group(1))
    return sorted(r.split(";")[0].strip() for r in reqs)


def _version(python: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys, venv; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None  # e.g. a pyenv shim for a version not selected
    major, minor = out.stdout.split()
    return int(major), int(minor)


def find_python() -> tuple[str, tuple[int, int]]:
    """An interpreter >= 3.12 and its version, or raise Unavailable naming where we looked."""
    candidates: list[str] = []
    if os.environ.get("VMKG_HELM_PYTHON"):
        candidates.append(os.environ["VMKG_HELM_PYTHON"])
    for name in ("python3.13", "python3.12"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    pyenv = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    candidates += sorted(glob.glob(f"{pyenv}/versions/3.1[2-9]*/bin/python3"), reverse=True)
    candidates += sorted(glob.glob("/usr/bin/python3.1[2-9]") + glob.glob("/usr/local/bin/python3.1[2-9]"),
                         reverse=True)
    for python in candidates:
        v = _version(python)
        if v is not None and v >= MIN_PYTHON:
            return python, v
    raise Unavailable(f"no Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} for helm-sdkpy (looked at $VMKG_HELM_PYTHON, "
                      f"python3.13/python3.12 on PATH, {pyenv}/versions, /usr/bin, /usr/local/bin)")


def venv_path(requirements: list[str], version: tuple[int, int]) -> Path:
    key = hashlib.sha256(repr((requirements, version)).encode()).hexdigest()[:12]
    return cache_dir() / "helm" / f"venv-{key}"


def ensure(log=lambda msg: print(f"helm toolchain: {msg}", file=sys.stderr)) -> Path:
    """The toolchain venv's python, building the venv first if needed."""
    python, version = find_python()
    requirements = pins()
    venv = venv_path(requirements, version)
    if (venv / ".complete").exists():
        return venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating {venv} with {python} ({version[0]}.{version[1]}): {' '.join(requirements)}")
    tmp = Path(tempfile.mkdtemp(prefix=venv.name + ".", dir=venv.parent))
    try:
        subprocess.run([python, "-m", "venv", str(tmp)], check=True)
        # pip bakes the venv's path into its scripts; we only ever run `python -m` / render.py
        out = subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q",
                              "--disable-pip-version-check", *requirements],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise Unavailable(f"pip could not install {requirements}: {out.stderr.strip()[-2000:]}")
        (tmp / ".complete").write_text("\n".join(requirements) + "\n")
        try:
            tmp.rename(venv)
        except OSError:  # another process finished first: use its venv
            if not (venv / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return venv / "bin" / "python"


if __name__ == "__main__":
    try:
        print(ensure())
    except Unavailable as exc:
        print(f"helm toolchain unavailable: {exc}", file=sys.stderr)
        sys.exit(3)
