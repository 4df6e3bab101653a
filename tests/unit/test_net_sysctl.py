"""A slot's namespace sysctls where /proc/sys is read-only (a Kubernetes container): a
value the namespace already has (IPv4 forwarding, inherited from the host's initial
namespace) is not written; one it lacks is a clear error when the slot needs it and a
warning when the slot's rules cover it (IPv6). Run in a namespace of their own
(``unshare``: network and mount), with /proc/sys bound read-only. Needs root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, logging, subprocess, sys
subprocess.run(["mount", "--bind", "/proc/sys", "/proc/sys"], check=True)
subprocess.run(["mount", "-o", "remount,bind,ro", "/proc/sys"], check=True)
from kernelmanager.exceptions import VMStartError
from kernelmanager.net import slots
warnings = []
logging.getLogger("kernelmanager.net.slots").addHandler(
    type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
out = {}
forwarding = open("/proc/sys/net/ipv4/ip_forward").read().strip()
try:
    slots._ensure_sysctl("net/ipv4/ip_forward", forwarding, required=True)  # already so
    out["same"] = "ok"
except Exception as exc:
    out["same"] = repr(exc)
other = "0" if forwarding == "1" else "1"
try:
    slots._ensure_sysctl("net/ipv4/ip_forward", other, required=True)
    out["required"] = "written"
except VMStartError as exc:
    out["required"] = str(exc)
ipv6 = open("/proc/sys/net/ipv6/conf/all/disable_ipv6").read().strip()
slots._ensure_sysctl("net/ipv6/conf/all/disable_ipv6", "0" if ipv6 == "1" else "1", required=False)
out["warnings"] = warnings
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")
def test_read_only_proc_sys() -> None:
    r = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", sys.executable, "-c", CHILD],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["same"] == "ok"
    assert "cannot set net.ipv4.ip_forward" in out["required"] and "pod sysctl" in out["required"], out
    assert len(out["warnings"]) == 1 and "drop that traffic anyway" in out["warnings"][0], out
