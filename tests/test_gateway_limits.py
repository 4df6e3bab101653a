"""Limits and kernel names of ``vmkg serve``: max_kernels and max_kernels_per_user answered
with 403 and a clear message (also under concurrent requests), the pool staying within
max_kernels, one kernelspec per template, forced kernel names, the replay buffer's bound
(output beyond it dropped, and the client told)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from gateway_helpers import Channels, Gateway

pytestmark = pytest.mark.vm
KERNEL = "python3-microvm"


@pytest.fixture(scope="module")
def gateway_options(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    # a second template, listed but never started here (so never baked by these tests)
    templates = tmp_path_factory.mktemp("gwl") / "templates.json"
    templates.write_text(json.dumps({"data": {"display_name": "Data (microVM)", "memory_mb": 2048}}))
    return (["--max-kernels=3", "--max-kernels-per-user=1", "--pool-size=1", f"--force-kernel-name={KERNEL}",
             "--VMMappingKernelManager.max_buffered_messages=20"],
            {"VMKG_TEMPLATES": str(templates)})


def running(gw: Gateway) -> list[str]:
    return [k["id"] for k in gw.request("GET", "/api/kernels").json()]


def clear(gw: Gateway) -> None:
    for kid in gw.kernel_ids():
        gw.delete_kernel(kid)


def test_one_kernelspec_per_template_and_forced_name(gw: Gateway) -> None:
    specs = gw.request("GET", "/api/kernelspecs").json()["kernelspecs"]
    assert set(specs) == {KERNEL, "data-microvm", "python3-net-microvm"}
    assert specs["data-microvm"]["spec"]["display_name"] == "Data (microVM)"
    assert specs["data-microvm"]["spec"]["metadata"]["kernel_provisioner"]["config"] == {"template": "data"}
    model = gw.start_kernel("data-microvm")  # forced to python3-microvm
    assert model["name"] == KERNEL
    gw.delete_kernel(model["id"])


def test_limits_answer_403_with_a_clear_message(gw: Gateway) -> None:
    clear(gw)
    gw.wait_pool(1)
    alice = gw.start_kernel(env={"KERNEL_USERNAME": "alice"})
    r = gw.request("POST", "/api/kernels", json={"env": {"KERNEL_USERNAME": "alice"}})
    assert r.status_code == 403
    assert r.json()["reason"] == "Forbidden"
    assert "max_kernels_per_user" in r.json()["message"] and "'alice'" in r.json()["message"]
    bob = gw.start_kernel(env={"KERNEL_USERNAME": "bob"})
    gw.start_kernel(env={"KERNEL_USERNAME": "carol"})
    r = gw.request("POST", "/api/kernels", json={"env": {"KERNEL_USERNAME": "dave"}})
    assert r.status_code == 403 and "max_kernels" in r.json()["message"] and "3" in r.json()["message"]
    r = gw.request("POST", "/api/kernels", json={})  # no user: the global limit still applies
    assert r.status_code == 403
    # at the limit the pool does not grow past it either
    assert gw.metric("vmkg_kernels", state="pooled") == 0
    assert gw.metric("vmkg_vms") == 3
    gw.delete_kernel(alice["id"])
    gw.start_kernel(env={"KERNEL_USERNAME": "dave"})
    gw.delete_kernel(bob["id"])
    gw.start_kernel(env={"KERNEL_USERNAME": "alice"})  # alice's slot is free again
    clear(gw)


def test_concurrent_requests_cannot_overshoot(gw: Gateway) -> None:
    clear(gw)
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda i: gw.request("POST", "/api/kernels",
                                                   json={"env": {"KERNEL_USERNAME": f"u{i}"}}), range(6)))
    codes = sorted(r.status_code for r in results)
    assert codes == [201, 201, 201, 403, 403, 403], [r.text for r in results]
    assert len(gw.kernel_ids()) == 3
    with ThreadPoolExecutor(3) as ex:  # the same user, concurrently: only one gets a kernel
        clear(gw)
        results = list(ex.map(lambda i: gw.request("POST", "/api/kernels",
                                                   json={"env": {"KERNEL_USERNAME": "eve"}}), range(3)))
    assert sorted(r.status_code for r in results) == [201, 403, 403]
    clear(gw)


async def test_output_beyond_the_replay_buffer_is_dropped_with_a_notice(gw: Gateway) -> None:
    clear(gw)
    kid = gw.start_kernel()["id"]
    try:
        session = uuid.uuid4().hex
        ch = await Channels.open(gw, kid, session=session)
        msg_id = await ch.send("execute_request", {
            "code": "import time\ntime.sleep(1)\nfor i in range(100):\n    print(i, flush=True)\n"
                    "    time.sleep(0.01)", "silent": False})
        await ch.close()  # gone before the output starts
        for state in ("busy", "idle"):  # the cell ran to its end with no client connected
            deadline = time.monotonic() + 180
            while gw.request("GET", f"/api/kernels/{kid}").json()["execution_state"] != state:
                assert time.monotonic() < deadline, f"kernel never {state}"
                await asyncio.sleep(0.2)
        ch = await Channels.open(gw, kid, session=session)
        notices: list[str] = []
        text = ""  # print() writes the number and its newline apart: they may land in two messages
        reply = idle = False
        while not (reply and idle):
            m = await ch.recv(60)
            if m.msg_type == "stream" and m.content["text"].startswith("[vmkg]"):
                notices.append(m.content["text"])
            elif m.parent.get("msg_id") != msg_id:
                continue
            elif m.msg_type == "stream":
                text += m.content["text"]
            elif m.msg_type == "status" and m.content["execution_state"] == "idle":
                idle = True
            elif m.channel == "shell":
                reply = m.content["status"] == "ok"
        await ch.close()
        assert len(notices) == 1, notices
        found = re.match(r"\[vmkg\] (\d+) messages of this kernel were dropped while no client "
                         r"was connected \(replay buffer limit: 20 messages", notices[0])
        assert found, notices[0]
        numbers = text.split()
        assert numbers and numbers[-1] == "99" and len(numbers) < 100  # the newest were kept
    finally:
        gw.delete_kernel(kid)
