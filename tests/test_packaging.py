"""The server's wheel carries the whole server.

Fast lane (no VM), but it builds the wheel the way the container image installs the
project (``pip install .``: not editable). An editable install finds every module in the
checkout whatever the packaging says, so only a real wheel shows a subpackage or a data
directory the configuration leaves out (as it once left out ``kernelmanager.net`` and
``kernelmanager.store``: a Helm host would have failed at its first networked kernel or
store access).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "kernelmanager", "guest")


def tracked_files() -> set[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout (the files git tracks are the reference)")
    out = subprocess.run(["git", "ls-files", "--", *PACKAGES], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return {f for f in out if (REPO / f).is_file()}


def test_the_wheel_carries_every_tracked_file_of_the_server(tmp_path: Path) -> None:
    want = tracked_files()
    assert {"kernelmanager/net/dns.py", "kernelmanager/store/__init__.py", "gateway/static/dashboard.js",
            "kernelmanager/image/files/vmkg-init"} <= want  # the reference itself is whole
    # from what the Dockerfile copies into the image's build stage (and nothing else), so
    # the build leaves nothing in the checkout either
    src = tmp_path / "src"
    for rel in (*want, "pyproject.toml", "README.md"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # a configuration setuptools finds ambiguous is one the next setuptools may read otherwise
    assert "Package would be ignored" not in r.stderr, r.stderr[-3000:]
    wheels = list(out.glob("vm_kernel_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
    missing = sorted(want - names)
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if n.startswith(("client/", "tests/", "vmkg_client/"))]
