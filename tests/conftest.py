"""Shared fixtures: the guest image and template are built/baked once (cached outside the
repo by recipe hash), kernelspecs are installed into a private JUPYTER_PATH, and the
session ends by checking that no QEMU process or VM directory was left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("VMKG_ACCEL", "auto")
# VMs of this session live in a state directory of their own, so a gateway or another
# session on the same machine neither disturbs nor is disturbed by the leak checks
STATE_DIR = Path(tempfile.mkdtemp(prefix="vmkg-test-state-"))
os.environ["VMKG_STATE_DIR"] = str(STATE_DIR)


def qemu_pids() -> set[int]:
    """QEMU processes of this session's VMs (their arguments name our state directory)."""
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{STATE_DIR}"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@pytest.fixture(scope="session")
def template():  # type: ignore[no-untyped-def]
    """The baked python3 template (built on first use: minutes; cached: milliseconds)."""
    from kernelmanager.runtime import Runtime
    from kernelmanager.templates import ensure_template, get_spec

    return Runtime.instance().run_sync(ensure_template(get_spec("python3")), timeout=3600)


@pytest.fixture(scope="session", autouse=True)
def jupyter_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernelspecs for every template, visible only to this test session."""
    from kernelmanager.kernelspec import kernelspec_json, kernelspec_name
    from kernelmanager.templates import catalog

    root = tmp_path_factory.mktemp("jupyter")
    for spec in catalog().values():
        d = root / "kernels" / kernelspec_name(spec.name)
        d.mkdir(parents=True)
        (d / "kernel.json").write_text(json.dumps(kernelspec_json(spec)))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    yield root
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="session", autouse=True)
def no_leaks() -> Iterator[None]:
    """After the session: no QEMU we started is running, no VM directory remains."""
    from kernelmanager import paths

    before = qemu_pids()
    yield
    from kernelmanager.runtime import Runtime

    if Runtime._instance is not None:
        Runtime._instance.shutdown()
    deadline = time.monotonic() + 10
    while qemu_pids() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = qemu_pids() - before
    vms = list(paths.vms_dir().iterdir()) if paths.vms_dir().exists() else []
    assert not leftover, f"QEMU processes left behind: {leftover}"
    assert not vms, f"VM directories left behind: {vms}"
    shutil.rmtree(STATE_DIR, ignore_errors=True)
