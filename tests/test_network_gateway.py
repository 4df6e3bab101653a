"""The network API of ``vmkg serve``: a create request's ``network``, the model's policy,
``GET|PATCH /api/kernels/{id}/network``, its errors (400 / 403 / 409 / 404), kill -9 of
the gateway leaving no slot behind."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from gateway_helpers import Channels, Gateway

pytestmark = pytest.mark.vm
if os.geteuid() != 0:
    pytest.skip("network namespaces need root", allow_module_level=True)

NET = "python3-net-microvm"
ENV = {"VMKG_NET_DNS_UPSTREAM": "127.0.0.1:9", "VMKG_NET_USER_EGRESS": "pypi, 198.51.100.0/24",
       "VMKG_NET_POOL": "1"}


@pytest.fixture(scope="module")
def gateway_options(tmp_path_factory: pytest.TempPathFactory, net_template: object) -> tuple[list[str], dict[str, str]]:
    users = tmp_path_factory.mktemp("netusers") / "users.json"
    digest = hashlib.sha256(b"bob-token-0123456789").hexdigest()
    users.write_text(json.dumps({"bob": f"sha256:{digest}"}))
    return ["--pool-size=0"], {**ENV, "VMKG_USERS_FILE": str(users)}


def slots() -> set[str]:
    p = Path("/run/netns")
    return {x.name for x in p.iterdir() if x.name.startswith("vmkg-")} if p.is_dir() else set()


def test_request_errors_before_any_vm(gw: Gateway) -> None:
    r = gw.request("POST", "/api/kernels", json={"name": "python3-microvm", "network": {"egress": ["pypi"]}})
    assert r.status_code == 400 and "python3-net" in r.json()["message"], r.text
    r = gw.request("POST", "/api/kernels", json={"name": NET, "network": {"egress": ["10.0.0.0/33"]}})
    assert r.status_code == 400 and "10.0.0.0/33" in r.json()["message"], r.text
    r = gw.request("POST", "/api/kernels", json={"name": NET, "network": {"egress": ["0.0.0.0/0"]}})
    assert r.status_code == 403 and "0.0.0.0/0" in r.json()["message"] and "pypi" in r.json()["message"], r.text
    r = gw.request("POST", "/api/kernels", json={"name": NET, "network": ["pypi"]})
    assert r.status_code == 400, r.text
    assert not gw.kernel_ids()


def test_policy_in_the_model_and_patch(gw: Gateway) -> None:
    r = gw.request("POST", "/api/kernels", json={"name": NET, "network": {"egress": ["198.51.100.0/25:443"]}})
    assert r.status_code == 201, r.text
    model = r.json()
    kid = model["id"]
    try:
        assert model["vmkg"]["network"] == {"egress": ["198.51.100.0/25:443"]}
        info = gw.request("GET", f"/api/kernels/{kid}/network").json()
        assert info["egress"] == ["198.51.100.0/25:443"] and info["denied_connections"] == 0
        r = gw.request("PATCH", f"/api/kernels/{kid}/network", json={"egress": ["pypi"]})
        assert r.status_code == 200 and r.json() == {"egress": ["pypi"]}, r.text
        assert gw.request("GET", f"/api/kernels/{kid}").json()["vmkg"]["network"] == {"egress": ["pypi"]}
        r = gw.request("PATCH", f"/api/kernels/{kid}/network", json={"egress": ["10.0.0.0/8"]})
        assert r.status_code == 403, r.text
        r = gw.request("PATCH", f"/api/kernels/{kid}/network", json={"egress": ["x:y:z"]})
        assert r.status_code == 400, r.text
        # another user's kernel: 404, as for an unknown one
        r = gw.request("PATCH", f"/api/kernels/{kid}/network", token="bob-token-0123456789",
                       json={"egress": []})
        assert r.status_code == 404, r.text
    finally:
        gw.delete_kernel(kid)
    plain = gw.start_kernel("python3-microvm")
    try:
        assert plain["vmkg"]["network"] is None
        r = gw.request("PATCH", f"/api/kernels/{plain['id']}/network", json={"egress": []})
        assert r.status_code == 409 and "python3-net" in r.json()["message"], r.text
    finally:
        gw.delete_kernel(plain["id"])


async def test_denied_connections_metric(gw: Gateway) -> None:
    """``vmkg_network_denied_connections_total{template}`` counts what the kernels'
    firewalls refused, and keeps counting what a deleted kernel's slot had refused."""
    metric = "vmkg_network_denied_connections_total"
    before = gw.metric(metric, template="python3-net")
    kid = gw.start_kernel(NET)["id"]  # deny-all
    try:
        ch = await Channels.open(gw, kid)
        try:
            r = await ch.execute("import socket\nfor p in (80, 81, 82):\n    try:\n"
                                 "        socket.create_connection(('198.51.100.7', p), timeout=5)\n"
                                 "    except OSError as e:\n        print(type(e).__name__)", timeout=300)
        finally:
            await ch.close()
        assert r.stdout.split() == ["ConnectionRefusedError"] * 3, r
        gw.wait_for(lambda: gw.metric(metric, template="python3-net") >= before + 3, 60, "the metric")
    finally:
        gw.delete_kernel(kid)
    # a refresh started after the deletion (the scrape after REFRESH s starts one, the
    # next serves it): the deleted kernel's refusals are still counted
    await asyncio.sleep(6)
    gw.metrics()
    await asyncio.sleep(3)
    assert gw.metric(metric, template="python3-net") >= before + 3


def test_kill_9_of_the_gateway_leaves_no_slot(tmp_path: Path) -> None:
    from kernelmanager import reaper
    before = slots()
    g = Gateway(tmp_path, "--pool-size=0", env=ENV)
    try:
        r = g.request("POST", "/api/kernels", json={"name": NET, "network": {"egress": ["pypi"]}})
        assert r.status_code == 201, r.text
        assert slots() - before
        g.proc.send_signal(signal.SIGKILL)
        g.proc.wait()
        # QEMU dies with its owner; the next runtime start reaps the rest (here: the reaper)
        deadline = time.monotonic() + 30
        while True:
            reaper.reap_orphans(g.state_dir / "vms", min_age=0)
            if not (slots() - before) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not (slots() - before)
        g.assert_clean()
    finally:
        g.stop()  # after the kill: only closes the log and the pipe
