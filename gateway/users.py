"""Users of a shared gateway: tokens mapped to user names, and who may act on which kernel.

**Tokens.** The users file (``TokenIdentityProvider.users_file``, ``$VMKG_USERS_FILE``)
is a JSON object mapping user names to the SHA-256 of their tokens::

    {"alice": "sha256:3f1c...64 hex digits", "bob": "sha256:..."}

The gateway never stores a user's token, only its hash; a presented token is hashed and
compared with every entry in constant time (``hmac.compare_digest``, no early exit).
``vmkg user add NAME [--users-file=FILE]`` prints a new token and its entry (and adds it
to FILE). The file is re-read when its modification time changes (users can be added
without a restart; a file that no longer parses keeps the previous users and logs an
error). The gateway's own token (``auth_token``) stays the admin's.

**Who may act on a kernel** (:func:`may_act`, used by the kernel manager's
``check_owner``, the one place every handler asks): a kernel belongs to the user who
created or forked it. The admin token and ``--no-auth`` mode see and act on every kernel;
a user only on their own; anyone else gets the 404 of an unknown kernel. The kernel-id
credential of the channels websocket (see ``gateway.auth``) is a principal for exactly
the one kernel named in its URL.

**Per-user limits** (:func:`limit_name`) count the authenticated user; only for the
admin and in no-auth mode does the client-supplied ``KERNEL_USERNAME`` count, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping
from typing import Any

from traitlets import Unicode
from traitlets.config import Application

#: the user names of principals that are not users-file users
ADMIN = "gateway"  # the gateway's own token (auth_token)
ANONYMOUS = "anonymous"  # --no-auth
KERNEL_ID_PREFIX = "kernel-id:"  # the kernel-id credential, followed by the kernel's id
RESERVED = {ADMIN, ANONYMOUS, "kernel-id"}
#: what a user name may be (no ':' so it never looks like a kernel-id principal)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
HASH_PREFIX = "sha256:"
HEX = re.compile(r"[0-9a-f]{64}")
MAX_USERS_FILE = 1 << 20

log = logging.getLogger("vmkg.gateway")


class UsersFileError(ValueError):
    """The users file cannot be used (its message says what to fix)."""


def hash_token(token: str) -> str:
    """The users-file entry for ``token``: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def parse_users(text: str, source: str = "users file") -> dict[str, str]:
    """User name -> hex SHA-256 of the token, from the users file's JSON text."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsersFileError(f"{source}: not JSON ({exc}); expected "
                             '{"alice": "sha256:<64 hex digits>", ...}') from None
    if not isinstance(data, dict):
        raise UsersFileError(f"{source}: expected a JSON object of user names to 'sha256:<hex>'")
    users: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, value in data.items():
        if not NAME.fullmatch(name) or name in RESERVED:
            raise UsersFileError(f"{source}: invalid user name {name[:70]!r}: letters, digits and "
                                 f"'_.@-', at most 64, not one of {', '.join(sorted(RESERVED))}")
        digest = value[len(HASH_PREFIX):].lower() if isinstance(value, str) \
            and value.startswith(HASH_PREFIX) else None
        if digest is None or not HEX.fullmatch(digest):
            raise UsersFileError(f"{source}: user {name!r}: expected 'sha256:<64 hex digits>' "
                                 "(`vmkg user add NAME` prints one), not a plain token")
        if digest in seen:
            raise UsersFileError(f"{source}: users {seen[digest]!r} and {name!r} have the same token")
        seen[digest] = name
        users[name] = digest
    return users


def load_users(path: str) -> dict[str, str]:
    """:func:`parse_users` of the file at ``path`` (at most 1 MiB)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_USERS_FILE + 1)
    except OSError as exc:
        raise UsersFileError(f"users file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_USERS_FILE:
        raise UsersFileError(f"users file {path}: larger than {MAX_USERS_FILE} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise UsersFileError(f"users file {path}: not UTF-8") from None
    return parse_users(text, f"users file {path}")


def match(users: Mapping[str, str], token: str) -> str | None:
    """The user whose token ``token`` is, or None. Compares with every entry in constant time."""
    digest = hashlib.sha256(token.encode()).hexdigest().encode()
    found = None
    for name, expected in users.items():
        if hmac.compare_digest(digest, expected.encode()):
            found = name
    return found


class UsersFile:
    """The users file, re-read when its modification time changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.users: dict[str, str] = {}
        self.reload(strict=True)

    def reload(self, strict: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            self.users = load_users(self.path)
            self._stamp = stamp
            log.info("users file %s: %d users", self.path, len(self.users))
        except (OSError, UsersFileError) as exc:
            if strict:
                raise UsersFileError(str(exc)) from None
            log.error("users file %s: keeping the previous %d users: %s", self.path,
                      len(self.users), exc)
            self._stamp = None

    def lookup(self, token: str) -> str | None:
        self.reload()
        return match(self.users, token)


# -- who may act on a kernel -------------------------------------------------------------------


def _name(user: Any) -> str:
    return str(getattr(user, "username", "") or "")


def sees_all(user: Any) -> bool:
    """The admin token, or no-auth mode."""
    return _name(user) in (ADMIN, ANONYMOUS)


def tenant(user: Any) -> str | None:
    """The users-file user name of ``user``; None for the admin, no-auth and kernel-id."""
    name = _name(user)
    if not name or name in RESERVED or name.startswith(KERNEL_ID_PREFIX):
        return None
    return name


def owner_name(user: Any) -> str:
    """What the kernel manager records as the owner of a kernel ``user`` starts or forks."""
    return tenant(user) or ADMIN


def may_act(user: Any, kernel_id: str, owner: str | None) -> bool:
    """May ``user`` see and act on kernel ``kernel_id``, owned by ``owner``?"""
    if user is None:
        return False
    name = _name(user)
    if sees_all(user):
        return True
    if name.startswith(KERNEL_ID_PREFIX):
        return name == KERNEL_ID_PREFIX + kernel_id
    return owner is not None and tenant(user) is not None and owner == name


def limit_name(user: Any, env: Mapping[str, str]) -> str:
    """Whom ``max_kernels_per_user`` counts: the authenticated user, or (admin, no-auth)
    the client-supplied ``KERNEL_USERNAME``."""
    return tenant(user) or str(env.get("KERNEL_USERNAME", ""))


# -- vmkg user add -----------------------------------------------------------------------------


def add_user(name: str, path: str = "") -> tuple[str, str]:
    """A new token for ``name`` and its users-file entry; with ``path``, the entry is added
    to that file (created 0600 if missing; replaced atomically)."""
    if not NAME.fullmatch(name) or name in RESERVED:
        raise UsersFileError(f"invalid user name {name[:70]!r}: letters, digits and '_.@-', "
                             f"at most 64, not one of {', '.join(sorted(RESERVED))}")
    token = secrets.token_urlsafe(32)
    entry = hash_token(token)
    if path:
        current = load_users(path) if os.path.exists(path) else {}
        data = {user: HASH_PREFIX + digest for user, digest in current.items()}
        data[name] = entry
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    return token, entry


class UserApp(Application):
    name = "vmkg user"
    description = ("Make a user of a shared gateway: `vmkg user add NAME [--users-file=FILE]` prints "
                   "a new token (give it to the user) and its users-file entry, and adds it to FILE.")
    users_file = Unicode("", config=True, help="The users file to add the user to ($VMKG_USERS_FILE).")
    aliases = {"users-file": "UserApp.users_file"}

    def start(self) -> None:
        args = list(self.extra_args)
        if len(args) != 2 or args[0] != "add":
            print("usage: vmkg user add NAME [--users-file=FILE]", file=sys.stderr)
            self.exit(2)
        path = self.users_file or os.environ.get("VMKG_USERS_FILE", "")
        try:
            token, entry = add_user(args[1], path)
        except UsersFileError as exc:
            print(f"vmkg: error: {exc}", file=sys.stderr)
            self.exit(1)
        print(f"token: {token}")
        print(f'entry: "{args[1]}": "{entry}"')
        if path:
            print(f"added to {path}")
