"""``%fork`` from a notebook cell, at the protocol level, against a live ``vmkg serve``.

A cell of alice's kernel runs ``%fork 2``: the magic answers at once with a display that is
updated in place (``update_display_data``, same ``display_id``) with the branch ids; the
branches are ordinary kernels listed by GET /api/kernels for alice (and the admin), not
for bob; each has ``__fork__`` = {index, parent_id}; they start from the state right after
the forking cell (a cell sent while it still ran is held, and is not in them); a branch's
changes stay in the branch. Then the refusals, each shown in the cell: alice's kernel limit, the per-kernel
rate limit, and (a second gateway) the fork-image budget.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import Channels, Gateway, serving

from gateway.users import hash_token

pytestmark = pytest.mark.vm
ALICE = "alice-" + uuid.uuid4().hex
BOB = "bob-" + uuid.uuid4().hex
BRANCH = re.compile(r"branch (\d+): ([0-9a-f-]{36})")


@pytest.fixture(scope="module")
def gateway_options(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    path = tmp_path_factory.mktemp("users") / "users.json"
    path.write_text(json.dumps({"alice": hash_token(ALICE), "bob": hash_token(BOB)}))
    return (["--pool-size=0", "--max-kernels-per-user=3", f"--users-file={path}"],
            {"VMKG_GUEST_FORKS_PER_MINUTE": "1"})


async def send_cell(ch: Channels, code: str) -> str:
    return await ch.send("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {},
        "allow_stdin": False, "stop_on_error": True})


async def first_display(ch: Channels, msg_id: str, timeout: float = 120) -> tuple[str, str]:
    """Read until the cell ``msg_id`` shows its %fork display; (display_id, text)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await ch.recv(max(0.1, deadline - time.monotonic()))
        transient = m.content.get("transient") or {}
        if m.msg_type == "display_data" and m.parent.get("msg_id") == msg_id and transient.get("display_id"):
            return transient["display_id"], m.content["data"]["text/plain"]


async def fork_outcome(ch: Channels, msg_id: str, timeout: float = 600, display_id: str | None = None,
                       first: str = "") -> tuple[str, str, list[Any]]:
    """Read until the cell ``msg_id`` is done and its %fork display got its final update.
    Returns (the first display's text, the final text, every message seen)."""
    deadline = time.monotonic() + timeout
    final = ""
    reply = idle = False
    seen: list[Any] = []
    while not (reply and idle and final):
        m = await ch.recv(max(0.1, deadline - time.monotonic()))
        seen.append(m)
        transient = m.content.get("transient") or {}
        if m.msg_type == "display_data" and m.parent.get("msg_id") == msg_id and transient.get("display_id"):
            display_id, first = transient["display_id"], m.content["data"]["text/plain"]
        elif m.msg_type == "update_display_data" and display_id and transient.get("display_id") == display_id:
            final = m.content["data"]["text/plain"]
            assert "text/html" in m.content["data"]
        elif m.msg_type == "execute_reply" and m.parent.get("msg_id") == msg_id:
            assert m.content["status"] == "ok", m.content
            reply = True
        elif m.msg_type == "status" and m.parent.get("msg_id") == msg_id \
                and m.content["execution_state"] == "idle":
            idle = True
    return first, final, seen


async def run(ch: Channels, code: str) -> None:
    r = await ch.execute(code)
    assert r.reply["status"] == "ok", r.reply


async def value(gw: Gateway, kernel_id: str, expr: str, token: str) -> Any:
    ch = await Channels.open(gw, kernel_id, token=token)
    try:
        return await ch.value(expr)
    finally:
        await ch.close()


def listed(gw: Gateway, token: str | None = None) -> dict[str, Any]:
    r = gw.request("GET", "/api/kernels", token=token)
    assert r.status_code == 200, r.text
    return {k["id"]: k for k in r.json()}


async def test_fork_from_a_cell(gw: Gateway) -> None:
    r = gw.request("POST", "/api/kernels", token=ALICE, json={"name": "python3-microvm"})
    assert r.status_code == 201, r.text
    parent = r.json()["id"]
    ch = await Channels.open(gw, parent, token=ALICE)
    try:
        t0 = time.monotonic()
        forking = await send_cell(ch, "x = 41\n%fork 2 --timeout 120\nimport time; time.sleep(3)\ny = x + 1")
        # %fork has run (its display is out) and the cell still sleeps: a cell sent now is
        # held by the agent until the snapshot, so it runs in the parent only
        display_id, first = await first_display(ch, forking)
        queued = await send_cell(ch, "w = 'sent while the forking cell ran'")
        first, final, _ = await fork_outcome(ch, forking, display_id=display_id, first=first)
        elapsed = time.monotonic() - t0
        assert "forking once this cell finishes" in first, first
        branches = [kid for _, kid in sorted((int(i), k) for i, k in BRANCH.findall(final))]
        assert len(branches) == 2, final
        assert "Change Kernel" in final and parent in final
        assert queued  # its effect (w) must be in the parent only: checked below
        print(f"%fork 2: branches listed in the cell {elapsed:.1f} s after the request")
        assert re.search(rf"kernel {parent}: %fork 2 asked from inside the kernel \(owner alice\)", gw.log())

        alice, admin, bob = listed(gw, ALICE), listed(gw), listed(gw, BOB)
        for i, kid in enumerate(branches):
            assert kid in alice and kid in admin and kid not in bob
            assert alice[kid]["parent_id"] == parent and alice[kid]["vmkg"]["source"] == "fork"
            got = await value(gw, kid, "[__fork__, x, y, 'w' in globals()]", ALICE)
            assert got == [{"index": i, "parent_id": parent}, 41, 42, False], got
        # a branch's change stays in the branch
        bch = await Channels.open(gw, branches[0], token=ALICE)
        try:
            await run(bch, "x = 'changed in branch 0'")
            assert await bch.value("x") == "changed in branch 0"
        finally:
            await bch.close()
        assert await ch.value("[x, y, w, '__fork__' in globals()]") == \
            [41, 42, "sent while the forking cell ran", False]
        assert await value(gw, branches[1], "x", ALICE) == 41

        # alice holds 3 kernels, her limit: refused (or rate-limited, if her first request
        # was less than a minute ago: the rate is checked first); the one right after it
        # is rate-limited (one request a minute per kernel in this module)
        _, final, _ = await fork_outcome(ch, await send_cell(ch, "%fork 1"))
        assert "refused" in final and ("max_kernels_per_user" in final or "rate limit" in final), final
        _, final, _ = await fork_outcome(ch, await send_cell(ch, "%fork 1"))
        assert "refused" in final and "rate limit" in final and "1 times a minute" in final, final
        # bad arguments are the magic's usage error, nothing reaches the host
        r = await ch.execute("%fork 0")
        assert r.reply["status"] == "error" and "1 to 64" in r.reply["evalue"], r.reply
        assert set(listed(gw, ALICE)) == {parent, *branches}

        # the limit is the owner's: bob's kernel asks for 3 branches, bob may hold 3 kernels
        r = gw.request("POST", "/api/kernels", token=BOB, json={"name": "python3-microvm"})
        assert r.status_code == 201, r.text
        bobs = r.json()["id"]
        bc = await Channels.open(gw, bobs, token=BOB)
        try:
            _, final, _ = await fork_outcome(bc, await send_cell(bc, "%fork 3"))
        finally:
            await bc.close()
        assert "refused" in final and "user 'bob' may hold at most 3 kernels" in final, final
        assert set(listed(gw, BOB)) == {bobs}
    finally:
        await ch.close()
        for kid in list(listed(gw)):
            gw.delete_kernel(kid)


async def test_fork_budget_refusal_in_the_cell(template: Any, tmp_path: Path) -> None:
    with serving(tmp_path, "--pool-size=0", env={"VMKG_FORK_BUDGET_MB": "1"}) as gw:
        parent = gw.start_kernel()["id"]
        ch = await Channels.open(gw, parent)
        try:
            _, final, _ = await fork_outcome(ch, await send_cell(ch, "v = 7\n%fork 1"))
            assert "refused" in final and "budget" in final, final
            assert await ch.value("v") == 7  # the parent keeps working
            assert set(listed(gw)) == {parent}
        finally:
            await ch.close()
            gw.delete_kernel(parent)


async def test_many_requests_do_not_pile_up(gw: Gateway) -> None:
    """A kernel that asks again while its first request is under way gets a refusal from
    its agent at once (one request per kernel at a time); an endless request line is
    refused without being buffered; the first request is still served."""
    parent = gw.start_kernel()["id"]
    ch = await Channels.open(gw, parent)
    try:
        code = ("import json, socket\n"
                "def ask():\n"
                "    s = socket.socket(socket.AF_UNIX); s.connect('/run/vmkg/kernel/fork.sock')\n"
                "    s.sendall(json.dumps({'count': 1, 'reseed': True, 'timeout': 60}).encode() + b'\\n')\n"
                "    return s\n"
                "first = ask(); second = ask()\n"
                "second.settimeout(30); answer = second.recv(4096).decode()\n"
                "junk = socket.socket(socket.AF_UNIX); junk.connect('/run/vmkg/kernel/fork.sock')\n"
                "junk.sendall(b'x' * 100000); junk.settimeout(30); bad = junk.recv(4096).decode()\n")
        await run(ch, code)
        answer = await ch.value("answer")
        assert "already under way" in answer, answer
        assert "bad %fork request" in await ch.value("bad")
        # the first is served once that cell is done
        got = await ch.value("first.recv(4096).decode()")
        assert '"ok": true' in got, got
    finally:
        await ch.close()
        for kid in list(listed(gw)):
            gw.delete_kernel(kid)
