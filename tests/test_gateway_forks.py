"""Forks over the gateway's HTTP API (POST /api/kernels/{id}/fork, GET .../forks) and the
files API they share state through, against a live ``vmkg serve`` with real VMs."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from typing import Any

import pytest
from fork_faults import BlockDeviceState
from gateway_helpers import Channels, Gateway

pytestmark = pytest.mark.vm
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@pytest.fixture(scope="module")
def gateway_options() -> tuple[list[str], dict[str, str]]:
    return ["--pool-size=0", "--max-fork-count=6"], {"VMKG_MAX_KERNELS": "5"}


async def value(gw: Gateway, kernel_id: str, code: str, expr: str = "None") -> Any:
    ch = await Channels.open(gw, kernel_id)
    try:
        if code:
            r = await ch.execute(code)
            assert r.reply["status"] == "ok", r.reply
        return await ch.value(expr)
    finally:
        await ch.close()


def fork(gw: Gateway, kernel_id: str, expect: int = 201, **body: Any) -> Any:
    r = gw.request("POST", f"/api/kernels/{kernel_id}/fork", json=body)
    assert r.status_code == expect, (r.status_code, r.text)
    return r.json()


async def test_fork_lineage_state_files_and_parent_deletion(gw: Gateway) -> None:
    parent = gw.start_kernel()["id"]
    try:
        r = gw.request("PUT", f"/api/kernels/{parent}/files/shared/input.txt", data=b"from parent")
        assert r.status_code == 201, r.text
        await value(gw, parent, "import numpy as np, os\nx = 41\narr = np.arange(10**6)")
        kids = fork(gw, parent, count=3)["kernels"]
        assert len(kids) == 3
        for m in kids:
            assert m["parent_id"] == parent and STAMP.match(m["forked_at"]), m
            assert m["vmkg"]["source"] == "fork"
        listed = gw.request("GET", f"/api/kernels/{parent}/forks").json()
        assert sorted(k["id"] for k in listed["kernels"]) == sorted(k["id"] for k in kids)
        assert {k["id"] for k in kids} <= {k["id"] for k in gw.request("GET", "/api/kernels").json()}
        ids = [k["id"] for k in kids]
        got = await asyncio.gather(*(value(gw, k, "", "[x, int(arr.sum()), open('shared/input.txt').read()]")
                                     for k in ids))
        assert got == [[41, 499999500000, "from parent"]] * 3
        # a file a branch writes is in no other branch and not in the parent
        r = gw.request("PUT", f"/api/kernels/{ids[0]}/files/mine.txt", data=b"branch 0")
        assert r.status_code == 201
        assert gw.request("GET", f"/api/kernels/{ids[1]}/files/mine.txt").status_code == 404
        assert gw.request("GET", f"/api/kernels/{parent}/files/mine.txt").status_code == 404
        # deleting the parent never breaks its branches; forks of forks work
        gw.delete_kernel(parent)
        assert await value(gw, ids[1], "x += 1", "x") == 42
        grand = fork(gw, ids[1], count=1)["kernels"][0]
        assert grand["parent_id"] == ids[1]
        assert await value(gw, grand["id"], "", "[x, open('shared/input.txt').read()]") == [42, "from parent"]
        for k in [*ids, grand["id"]]:
            gw.delete_kernel(k)
    finally:
        gw.delete_kernel(parent)


async def test_busy_parent_gets_409_and_bad_requests_400(gw: Gateway) -> None:
    parent = gw.start_kernel()["id"]
    try:
        ch = await Channels.open(gw, parent)
        try:
            msg_id = await ch.send("execute_request", {"code": "import time; time.sleep(6); y = 1", "silent": False,
                                                       "store_history": True, "user_expressions": {},
                                                       "allow_stdin": False, "stop_on_error": True})
            while True:  # until the kernel has started the cell
                m = await ch.recv()
                if m.msg_type == "status" and m.parent.get("msg_id") == msg_id \
                        and m.content["execution_state"] == "busy":
                    break
            r = gw.request("POST", f"/api/kernels/{parent}/fork", json={"count": 1, "timeout": 1})
            assert r.status_code == 409 and "busy" in r.json()["message"], r.text
            result = await ch.collect(msg_id)
            assert result.reply["status"] == "ok"  # the parent's cell was not disturbed
        finally:
            await ch.close()
        for body in ({"count": 0}, {"count": 7}, {"count": "2"}, {"count": 1, "reseed": "no"},
                     {"count": 1, "timeout": -1}):
            r = gw.request("POST", f"/api/kernels/{parent}/fork", json=body)
            assert r.status_code == 400 and r.json()["message"], (body, r.text)
        r = gw.request("POST", "/api/kernels/00000000-0000-0000-0000-000000000000/fork", json={"count": 1})
        assert r.status_code == 404
        # max_kernels (5) counts the branches a fork would add (1 running + 6 > 5)
        r = gw.request("POST", f"/api/kernels/{parent}/fork", json={"count": 6, "timeout": 60})
        assert r.status_code == 403 and "max_kernels" in r.json()["message"], r.text
    finally:
        gw.delete_kernel(parent)


async def test_a_fork_qemu_fails_is_503_with_the_reason(gw: Gateway) -> None:
    """A fork that fails mid-way is the runtime's ForkError, which the web layer answers
    with 503 and the reason (not a bare 500); no branch is left and the parent carries
    on. The gateway's QEMUs are jailed: QEMU saves the device state into a file the host
    made in the VM's directory and the host moves it into the fork directory, where the
    injected directory makes that move fail (an OS error; test_forks covers a QMP error
    from an unjailed QEMU)."""
    parent = gw.start_kernel()["id"]
    try:
        await value(gw, parent, "x = 1")
        with BlockDeviceState(gw.state_dir / "forks") as fault:
            r = gw.request("POST", f"/api/kernels/{parent}/fork", json={"count": 2})
        assert fault.blocked, "the fault was not injected"
        assert r.status_code == 503, r.text
        message = r.json()["message"]
        assert "fork snapshot failed" in message and "Is a directory" in message, message
        assert gw.request("GET", f"/api/kernels/{parent}/forks").json()["kernels"] == []
        assert not [k for k in gw.request("GET", "/api/kernels").json() if k["parent_id"] == parent]
        assert await value(gw, parent, "x += 1", "x") == 2
        assert not list((gw.state_dir / "forks").iterdir()), "a failed fork left its directory"
    finally:
        gw.delete_kernel(parent)


def test_file_paths_are_confined(gw: Gateway) -> None:
    kid = gw.start_kernel()["id"]
    try:
        # encoded, so no HTTP client normalises the dots away before the gateway sees them
        for path, status in (("..%2F..%2Fetc%2Fpasswd", 403), ("%2Fetc%2Fpasswd", 403),
                             ("a%2F..%2F..%2Fx", 403)):
            r = gw.request("GET", f"/api/kernels/{kid}/files/{path}")
            assert r.status_code == status, (path, r.status_code, r.text)
        # a symlink the kernel made pointing out of its home is not followed
        asyncio.run(value(gw, kid, "import os; os.symlink('/etc', 'escape')"))
        r = gw.request("GET", f"/api/kernels/{kid}/files/escape/passwd")
        assert r.status_code == 403, r.text
        r = gw.request("PUT", f"/api/kernels/{kid}/files/escape/owned", data=b"x")
        assert r.status_code == 403, r.text
        r = gw.request("GET", f"/api/kernels/{kid}/files/escape/")  # listing through it
        assert r.status_code == 403, r.text
        assert gw.request("GET", f"/api/kernels/{kid}/files/nope.txt").status_code == 404
    finally:
        gw.delete_kernel(kid)


def test_vmkg_fork_command_line(gw: Gateway) -> None:
    parent = gw.start_kernel()["id"]
    try:
        env = gw.client_env()
        out = subprocess.run([sys.executable, "-m", "gateway.app", "fork", parent, "-n", "2"],
                             capture_output=True, text=True, env=env, timeout=180)
        assert out.returncode == 0, out.stderr
        ids = out.stdout.split()
        assert len(ids) == 2
        for kid in ids:
            assert gw.request("GET", f"/api/kernels/{kid}").json()["parent_id"] == parent
            gw.delete_kernel(kid)
        bad = subprocess.run([sys.executable, "-m", "gateway.app", "fork", parent, "-n", "2",
                              "--token", "wrong"], capture_output=True, text=True, env=env, timeout=60)
        assert bad.returncode == 1 and "401" in bad.stderr, bad.stderr
    finally:
        gw.delete_kernel(parent)


async def test_full_guest_disk_is_a_clear_error_and_loses_nothing(gw: Gateway) -> None:
    kid = gw.start_kernel()["id"]
    try:
        free = await value(gw, kid, "import os; x = 'kept'; st = os.statvfs('.')", "st.f_bavail * st.f_frsize")
        # reserve all free blocks without writing them (ext4 unwritten extents: fast)
        await value(gw, kid, f"fd = os.open('filler', os.O_WRONLY | os.O_CREAT); os.posix_fallocate(fd, 0, {free - (4 << 20)}); os.close(fd)")
        err = await value(gw, kid, "", "__import__('subprocess').run(['sh', '-c', 'head -c 8000000 /dev/zero > more; rm -f more'], "
                                       "capture_output=True, text=True).stderr")
        assert "No space left" in err
        r = gw.request("PUT", f"/api/kernels/{kid}/files/upload.bin", data=b"x" * 8_000_000)
        assert r.status_code == 507 and "full" in r.json()["message"], r.text
        # the kernel and its state survived; freeing space makes it work again
        assert await value(gw, kid, "os.unlink('filler')", "x") == "kept"
        r = gw.request("PUT", f"/api/kernels/{kid}/files/upload.bin", data=b"x" * 2_000_000)
        assert r.status_code == 201, r.text
    finally:
        gw.delete_kernel(kid)
