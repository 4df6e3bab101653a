"""The client installs and works on its own: ``pip install ./client`` into a clean venv
(``python -m venv``; pip fetches setuptools and websockets from PyPI), where nothing of the
server is importable, then its ``vmkg-client`` command drives a live ``vmkg serve`` with
real VMs: run a cell, a failing cell, a cell from stdin as JSON, keep a kernel, fork it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_helpers import Gateway as LiveGateway

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[1]
SERVER_MODULES = ["jupyter_server", "tornado", "zmq", "ipykernel", "traitlets", "jupyter_client",
                  "gateway", "kernelmanager", "guest"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding vmkg-client and what it depends on, nothing else."""
    root = tmp_path_factory.mktemp("client-venv")
    # build from a copy, so the worktree gets no build/ or egg-info
    src = shutil.copytree(REPO / "client", root / "client",
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, env=env, timeout=300)
    pip = subprocess.run([str(root / "venv" / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return root / "venv"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything pointing at this checkout or the test venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and Path(sys.executable).parent != Path(p))
    return {**env, **extra}


@pytest.fixture(scope="module")
def gateway_options() -> tuple[list[str], dict[str, str]]:
    return ["--pool-size=1"], {}


@pytest.fixture(scope="module")
def live(gw: LiveGateway) -> LiveGateway:
    return gw


def test_the_clean_venv_has_the_client_and_nothing_of_the_server(venv: Path, tmp_path: Path) -> None:
    code = ("import importlib.util, json, vmkg_client, vmkg_client.sync, vmkg_client.cli\n"
            f"print(json.dumps({{m: importlib.util.find_spec(m) is not None for m in {SERVER_MODULES!r}}}))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         env=clean_env(), cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {m: False for m in SERVER_MODULES}
    freeze = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--all"],
                            capture_output=True, text=True, env=clean_env(), timeout=120).stdout
    names = {re.split(r"[=@ ]", line, maxsplit=1)[0].lower() for line in freeze.splitlines() if line}
    assert names - {"pip", "setuptools", "wheel"} == {"vmkg-client", "websockets"}, freeze
    helped = subprocess.run([str(venv / "bin" / "vmkg-client"), "--help"], capture_output=True,
                            text=True, env=clean_env(), timeout=60)
    assert helped.returncode == 0 and "run" in helped.stdout and "fork" in helped.stdout


def vmkg_client(venv: Path, live: LiveGateway, *args: str,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / "vmkg-client"), *args], input=stdin, capture_output=True,
                          text=True, env=clean_env(VMKG_URL=live.url, VMKG_TOKEN=live.token),
                          cwd=venv, timeout=300)


def kernel_ids(live: LiveGateway) -> set[str]:
    return {k["id"] for k in live.request("GET", "/api/kernels").json()}


def test_vmkg_client_from_the_clean_venv_drives_a_live_gateway(venv: Path, live: LiveGateway) -> None:
    before = kernel_ids(live)
    ok = vmkg_client(venv, live, "run", "import sys; print('from the vm', sys.platform); 6 * 7")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "from the vm linux\n42\n"
    raised = vmkg_client(venv, live, "run", "1 / 0")
    assert raised.returncode == 1 and "ZeroDivisionError" in raised.stderr
    unset = vmkg_client(venv, live, "run", "--json", stdin="import os\nos.environ['WHO']\n")
    assert unset.returncode == 1 and json.loads(unset.stdout)["error"]["name"] == "KeyError"
    with_env = vmkg_client(venv, live, "run", "--json", "--env", "WHO=agent", "-",
                           stdin="import os\nos.environ['WHO']\n")
    assert with_env.returncode == 0 and json.loads(with_env.stdout)["results"][0]["text"] == "'agent'"
    bad = vmkg_client(venv, live, "run", "--token", "wrong", "1")
    assert bad.returncode == 2 and "401" in bad.stderr
    assert kernel_ids(live) == before
    # keep a kernel, fork it, and the branch continues from its state
    kept = vmkg_client(venv, live, "run", "--keep", "x = 'warm'")
    assert kept.returncode == 0, kept.stderr
    kid = re.search(r"kernel (\S+) left running", kept.stderr).group(1)  # type: ignore[union-attr]
    branches: list[str] = []
    try:
        fork = vmkg_client(venv, live, "fork", kid, "-n", "1")
        assert fork.returncode == 0, fork.stderr
        branches = fork.stdout.split()
        assert len(branches) == 1 and branches[0] in kernel_ids(live)
        there = vmkg_client(venv, live, "run", "--kernel", branches[0], "print(x)")
        assert there.returncode == 0 and there.stdout == "warm\n", there.stderr
        assert {kid, *branches} <= kernel_ids(live)  # --kernel leaves it running
    finally:
        for k in (kid, *branches):
            live.delete_kernel(k)
    assert kernel_ids(live) == before
