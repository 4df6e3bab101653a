"""How ``vmkg serve`` is configured: --help-all, a config file, VMKG_* variables, a
generated token when none is set, JSON logs naming the kernel.

``--help-all`` needs no VM (fast lane); the rest runs a real gateway (``vm``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import Gateway


def test_help_all_lists_every_setting() -> None:
    p = subprocess.run([sys.executable, "-c", "from gateway.app import main; main()", "serve", "--help-all"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for option in ("--ServeApp.auth_token", "$VMKG_AUTH_TOKEN", "--ServeApp.port", "--ServeApp.allow_origin",
                   "--VMMappingKernelManager.max_kernels", "$VMKG_MAX_KERNELS",
                   "--VMMappingKernelManager.max_kernels_per_user", "--VMMappingKernelManager.pool_size",
                   "--VMMappingKernelManager.cull_idle_timeout", "--VMKGWebsocketConnection.write_high_water",
                   "--MicroVMProvisioner.env_allowlist"):
        assert option in p.stdout, option


@pytest.mark.vm
def test_config_file_environment_generated_token_and_json_logs(template: Any, tmp_path: Path) -> None:
    config = tmp_path / "vmkg_config.py"
    config.write_text("c.ServeApp.list_kernels = False\nc.VMMappingKernelManager.pool_size = 0\n")
    gw = Gateway(tmp_path, f"--config={config}", "--json-logs", token=None,
                 env={"VMKG_MAX_KERNELS": "1"})
    try:
        assert gw.token and len(gw.token) >= 24
        r = gw.request("GET", "/api/kernels")  # listing disabled by the config file
        assert r.status_code == 403 and "list_kernels" in r.json()["message"]
        assert gw.request("GET", "/api/kernelspecs", token="wrong").status_code == 401
        kid = gw.start_kernel()["id"]
        r = gw.request("POST", "/api/kernels", json={})  # VMKG_MAX_KERNELS=1
        assert r.status_code == 403
        assert gw.metric("vmkg_kernels", state="pooled") == 0
        records = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
        assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
        assert any(r.get("kernel_id") == kid and "started for" in r["message"] for r in records)
    finally:
        gw.stop_clean()
