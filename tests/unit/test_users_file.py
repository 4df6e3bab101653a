"""The users file (gateway.users): parsing, token hashes, reload, `vmkg user add`, who may
act on which kernel, whom per-user limits count, and the identity provider's answer for
each kind of token. No VMs: a fast-lane test (the live gateway is tests/test_users.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from jupyter_server.auth.identity import User

from gateway import users
from gateway.auth import TokenIdentityProvider

ALICE_TOKEN = "alice-secret"
BOB_TOKEN = "bob-secret"


def entry(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_hash_token_is_sha256_hex() -> None:
    assert users.hash_token("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_parse_and_match() -> None:
    bob_upper = "sha256:" + entry(BOB_TOKEN).removeprefix("sha256:").upper()
    parsed = users.parse_users(json.dumps({"alice": entry(ALICE_TOKEN), "bob": bob_upper}))
    assert set(parsed) == {"alice", "bob"}
    assert users.match(parsed, ALICE_TOKEN) == "alice"
    assert users.match(parsed, BOB_TOKEN) == "bob"  # hex case does not matter
    assert users.match(parsed, "nobody") is None
    assert users.match(parsed, "") is None
    assert users.match({}, ALICE_TOKEN) is None


@pytest.mark.parametrize("text, words", [
    ("not json", "not JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"alice": "alice-secret"}), "sha256:<64 hex digits>"),  # a plain token
    (json.dumps({"alice": "sha256:1234"}), "sha256:<64 hex digits>"),
    (json.dumps({"alice": 5}), "sha256:<64 hex digits>"),
    (json.dumps({"gateway": entry("x")}), "invalid user name"),  # the admin's name
    (json.dumps({"kernel-id:abc": entry("x")}), "invalid user name"),
    (json.dumps({"": entry("x")}), "invalid user name"),
    (json.dumps({"a" * 65: entry("x")}), "invalid user name"),
    (json.dumps({"alice": entry("same"), "bob": entry("same")}), "same token"),
])
def test_bad_files_are_refused_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(users.UsersFileError, match=re.escape(words)):
        users.parse_users(text)


def test_load_bounds_and_errors(tmp_path: Path) -> None:
    with pytest.raises(users.UsersFileError, match="No such file"):
        users.load_users(str(tmp_path / "missing.json"))
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (users.MAX_USERS_FILE + 1))
    with pytest.raises(users.UsersFileError, match="larger than"):
        users.load_users(str(big))
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(users.UsersFileError, match="UTF-8"):
        users.load_users(str(bad))


def test_users_file_is_reread_when_it_changes_and_kept_when_broken(tmp_path: Path) -> None:
    path = write(tmp_path / "users.json", {"alice": entry(ALICE_TOKEN)})
    uf = users.UsersFile(str(path))
    assert uf.lookup(ALICE_TOKEN) == "alice" and uf.lookup(BOB_TOKEN) is None
    write(path, {"alice": entry(ALICE_TOKEN), "bob": entry(BOB_TOKEN)})
    os.utime(path, ns=(1, 10**18))  # a different mtime, whatever the clock's granularity
    assert uf.lookup(BOB_TOKEN) == "bob"
    path.write_text("{broken")
    os.utime(path, ns=(1, 2 * 10**18))
    assert uf.lookup(BOB_TOKEN) == "bob"  # the previous users stay
    with pytest.raises(users.UsersFileError):
        users.UsersFile(str(path))  # but a gateway does not start with it


def test_add_user_prints_a_token_whose_hash_is_written(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    token, line = users.add_user("alice", str(path))
    assert line == users.hash_token(token) and len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token2, _ = users.add_user("bob", str(path))
    loaded = users.load_users(str(path))
    assert users.match(loaded, token) == "alice" and users.match(loaded, token2) == "bob"
    with pytest.raises(users.UsersFileError):
        users.add_user("gateway", str(path))
    assert users.add_user("carol")[1].startswith("sha256:")  # no file: only printed


def test_who_may_act_on_a_kernel() -> None:
    alice, bob = User("alice"), User("bob")
    admin, anon = User(users.ADMIN), User(users.ANONYMOUS)
    kid, other = "k-1", "k-2"
    assert users.may_act(alice, kid, "alice")
    assert not users.may_act(bob, kid, "alice")
    assert not users.may_act(alice, kid, users.ADMIN)  # the admin's kernels are the admin's
    assert not users.may_act(alice, kid, None)
    assert not users.may_act(None, kid, "alice")
    assert users.may_act(admin, kid, "alice") and users.may_act(anon, kid, "bob")
    by_id = User(users.KERNEL_ID_PREFIX + kid)  # the kernel-id websocket credential
    assert users.may_act(by_id, kid, "alice")
    assert not users.may_act(by_id, other, "alice")
    assert users.owner_name(alice) == "alice" and users.owner_name(admin) == users.ADMIN
    assert users.owner_name(None) == users.ADMIN and users.owner_name(by_id) == users.ADMIN


def test_per_user_limits_count_the_authenticated_user() -> None:
    claims = {"KERNEL_USERNAME": "alice"}
    assert users.limit_name(User("bob"), claims) == "bob"
    assert users.limit_name(User(users.ADMIN), claims) == "alice"
    assert users.limit_name(User(users.ANONYMOUS), claims) == "alice"
    assert users.limit_name(None, claims) == "alice"
    assert users.limit_name(User(users.ADMIN), {}) == ""


class FakeHandler:
    """What IdentityProvider.get_token reads of a handler: the token argument, headers."""

    def __init__(self, token: str = "", header: str = "", kernel_id: str = "",
                 credential: bool = False) -> None:
        self._token = token
        self.request = SimpleNamespace(headers={"Authorization": header} if header else {})
        self.path_kwargs = {"kernel_id": kernel_id}
        if credential:
            self.kernel_id_credential = lambda: True

    def get_argument(self, name: str, default: str = "") -> str:
        return self._token if name == "token" else default


def test_identity_provider_maps_tokens_to_users(tmp_path: Path) -> None:
    path = write(tmp_path / "users.json", {"alice": entry(ALICE_TOKEN), "bob": entry(BOB_TOKEN)})
    idp = TokenIdentityProvider(token="admin-token", users_file=str(path))

    def user(handler: FakeHandler) -> str | None:
        got = asyncio.run(idp.get_user(handler))  # type: ignore[arg-type]
        return None if got is None else got.username

    assert user(FakeHandler(header="token admin-token")) == users.ADMIN
    assert user(FakeHandler(header=f"Bearer {ALICE_TOKEN}")) == "alice"
    assert user(FakeHandler(token=BOB_TOKEN)) == "bob"
    assert user(FakeHandler(token="wrong")) is None
    assert user(FakeHandler(token=entry(ALICE_TOKEN))) is None  # the hash is not a token
    assert user(FakeHandler()) is None
    # no credential at all on a kernel-id websocket: a principal for that kernel only
    assert user(FakeHandler(kernel_id="k-1", credential=True)) == users.KERNEL_ID_PREFIX + "k-1"
    # a wrong token is refused even there
    assert user(FakeHandler(token="wrong", kernel_id="k-1", credential=True)) is None
    # without a users file only the admin token works
    plain = TokenIdentityProvider(token="admin-token")
    assert asyncio.run(plain.get_user(FakeHandler(token=ALICE_TOKEN))) is None  # type: ignore[arg-type]
