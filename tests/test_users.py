"""Users of one shared gateway (gateway.users): alice and bob, each with a token from the
users file, and the admin (the gateway's own token), against a live ``vmkg serve``.

Each user lists and reaches only their own kernels; another user's kernel answers every
route (model, delete, interrupt, restart, fork, forks, files, websocket) with exactly the
404 of an unknown kernel; a fork belongs to whoever forked; the admin sees and reaches
all; ``max_kernels_per_user`` counts the authenticated user, not a claimed
``KERNEL_USERNAME``; a token that is nobody's is 401. Three kernels in all (alice's, its
fork, bob's): the machine emulates the VMs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websockets
from gateway_helpers import Channels, Gateway

from gateway.users import hash_token

pytestmark = pytest.mark.vm
ALICE = "alice-" + uuid.uuid4().hex
BOB = "bob-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def gateway_options(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    path = tmp_path_factory.mktemp("users") / "users.json"
    path.write_text(json.dumps({"alice": hash_token(ALICE), "bob": hash_token(BOB)}))
    # the kernel-id websocket allowance on, to show a user's token never falls back to it
    return (["--pool-size=0", "--max-kernels-per-user=2", f"--users-file={path}",
             "--ServeApp.kernel_id_ws_auth=True"], {})


def start(gw: Gateway, token: str, env: dict[str, str] | None = None, expect: int = 201) -> dict[str, Any]:
    r = gw.request("POST", "/api/kernels", token=token, json={"name": "python3-microvm", "env": env or {}})
    assert r.status_code == expect, (r.status_code, r.text)
    model: dict[str, Any] = r.json()
    return model


def listed(gw: Gateway, token: str) -> set[str]:
    r = gw.request("GET", "/api/kernels", token=token)
    assert r.status_code == 200, r.text
    return {k["id"] for k in r.json()}


@pytest.fixture(scope="module")
def kernels(gw: Gateway) -> Iterator[dict[str, str]]:
    """alice's kernel, its fork (alice's) and bob's kernel (bob claiming to be alice)."""
    made: list[str] = []
    try:
        a = start(gw, ALICE)["id"]
        made.append(a)
        r = gw.request("POST", f"/api/kernels/{a}/fork", token=ALICE, json={"count": 1})
        assert r.status_code == 201, r.text
        child = r.json()["kernels"][0]
        made.append(child["id"])
        assert child["parent_id"] == a
        # alice holds two, her limit: bob claiming to be alice is still counted as bob
        b = start(gw, BOB, env={"KERNEL_USERNAME": "alice"})["id"]
        made.append(b)
        yield {"alice": a, "fork": child["id"], "bob": b}
    finally:
        for kid in made:
            gw.delete_kernel(kid)


def test_each_user_lists_only_their_own_and_the_admin_all(gw: Gateway, kernels: dict[str, str]) -> None:
    assert listed(gw, ALICE) == {kernels["alice"], kernels["fork"]}
    assert listed(gw, BOB) == {kernels["bob"]}
    assert listed(gw, gw.token) >= set(kernels.values())
    r = gw.request("GET", f"/api/kernels/{kernels['alice']}/forks", token=ALICE)
    assert [k["id"] for k in r.json()["kernels"]] == [kernels["fork"]]
    for kid in kernels.values():
        assert gw.request("GET", f"/api/kernels/{kid}", token=gw.token).status_code == 200


def test_per_user_limit_counts_the_authenticated_user(gw: Gateway, kernels: dict[str, str]) -> None:
    # (bob's kernel, started while alice held her two, is the other half: see `kernels`)
    r = gw.request("POST", "/api/kernels", token=ALICE, json={"env": {"KERNEL_USERNAME": "someone-else"}})
    assert r.status_code == 403, r.text
    assert "max_kernels_per_user" in r.json()["message"] and "'alice'" in r.json()["message"]


#: (method, path under /api/kernels/{id}, request kwargs): every route that names a kernel
ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "", {}),
    ("POST", "/interrupt", {}),
    ("POST", "/restart", {}),
    ("POST", "/fork", {"json": {"count": 1}}),
    ("GET", "/forks", {}),
    ("GET", "/files/", {}),
    ("GET", "/files/secret.txt", {}),
    ("PUT", "/files/planted.txt", {"data": b"from bob"}),
    ("DELETE", "/files/secret.txt", {}),
    ("DELETE", "", {}),  # last: if it were not refused, the kernel would be gone
]


def answer(r: requests.Response, kernel_id: str) -> tuple[int, str]:
    return r.status_code, r.text.replace(kernel_id, "<id>")


def test_another_users_kernel_is_404_like_an_unknown_one(gw: Gateway, kernels: dict[str, str]) -> None:
    a = kernels["alice"]
    r = gw.request("PUT", f"/api/kernels/{a}/files/secret.txt", token=ALICE, data=b"alice's")
    assert r.status_code == 201, r.text
    unknown = str(uuid.uuid4())
    for method, suffix, kwargs in ROUTES:
        for victim in (a, kernels["fork"]):
            theirs = gw.request(method, f"/api/kernels/{victim}{suffix}", token=BOB, **kwargs)
            nobodys = gw.request(method, f"/api/kernels/{unknown}{suffix}", token=BOB, **kwargs)
            assert theirs.status_code == 404, (method, suffix, theirs.text)
            assert answer(theirs, victim) == answer(nobodys, unknown), (method, suffix)
    # nothing happened to alice's kernels
    assert listed(gw, ALICE) == {a, kernels["fork"]}
    r = gw.request("GET", f"/api/kernels/{a}/files/secret.txt", token=ALICE)
    assert r.status_code == 200 and r.content == b"alice's"
    assert gw.request("GET", f"/api/kernels/{a}/files/planted.txt", token=ALICE).status_code == 404
    # and bob's own kernel answers bob
    assert gw.request("GET", f"/api/kernels/{kernels['bob']}", token=BOB).status_code == 200
    # the admin reaches alice's
    r = gw.request("GET", f"/api/kernels/{a}/files/secret.txt", token=gw.token)
    assert r.status_code == 200 and r.content == b"alice's"


async def test_websockets_only_to_ones_own_kernel(gw: Gateway, kernels: dict[str, str]) -> None:
    for victim in (kernels["alice"], kernels["fork"], str(uuid.uuid4())):
        with pytest.raises(websockets.InvalidStatus) as exc:
            await Channels.open(gw, victim, token=BOB)  # not the kernel-id allowance
        assert exc.value.response.status_code == 404
        assert json.loads(exc.value.response.body)["message"] == f"Kernel does not exist: {victim}"
    # bob's own kernel: his, and its KERNEL_USERNAME is the authenticated user, not his claim
    ch = await Channels.open(gw, kernels["bob"], token=BOB)
    try:
        assert await ch.value("__import__('os').environ.get('KERNEL_USERNAME')") == "bob"
    finally:
        await ch.close()


def test_a_token_that_is_nobodys_is_401(gw: Gateway, kernels: dict[str, str]) -> None:
    for token in ("nobody", hash_token(ALICE), hash_token(ALICE).removeprefix("sha256:")):
        r = gw.request("GET", "/api/kernels", token=token)
        assert r.status_code == 401 and r.json()["message"] == "Invalid token"
        assert gw.request("GET", f"/api/kernels/{kernels['alice']}", token=token).status_code == 401
