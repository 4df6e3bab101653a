"""File operations the host asks of the agent, confined to the kernel user's home.

Paths are relative to ``ROOT``; absolute paths, ``..`` and symlinks anywhere on the
path are refused. Every component is opened with ``O_NOFOLLOW`` relative to its
parent's descriptor, so a symlink swapped in between a check and a use cannot lead
outside either. Files are created owned by the kernel user.
"""

from __future__ import annotations

import base64
import errno
import os
import stat
from typing import Any

ROOT = "/home/jovyan"
OWNER = 1000
MAX_CHUNK = 8 << 20


class FileOpError(Exception):
    """A request the agent refuses; ``code`` becomes the host's error kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def split_path(path: str) -> list[str]:
    if not isinstance(path, str) or not path.strip("/"):
        raise FileOpError("invalid", "a file path relative to the kernel's home is required")
    if path.startswith("/"):
        raise FileOpError("forbidden", f"absolute paths are not allowed: {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise FileOpError("forbidden", f"'..' is not allowed in {path!r}")
    if "\0" in path:
        raise FileOpError("invalid", "NUL in path")
    return parts


def _open_parent(parts: list[str], create: bool) -> int:
    """A descriptor of the directory holding parts[-1], walked without following links."""
    fd = os.open(ROOT, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts[:-1]:
            try:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                os.chown(name, OWNER, OWNER, dir_fd=fd, follow_symlinks=False)
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise FileOpError("forbidden", f"{name!r} is a symlink or not a directory") from exc
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_symlink(dfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open(parts: list[str], flags: int, create_dirs: bool = False) -> int:
    dfd = _open_parent(parts, create_dirs)
    try:
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(dfd, parts[-1]):
            raise FileOpError("forbidden", f"{parts[-1]!r} is a symlink") from exc
        if exc.errno == errno.EISDIR:
            raise FileOpError("invalid", f"{'/'.join(parts)!r} is a directory") from exc
        raise
    finally:
        os.close(dfd)


def write(path: str, data: bytes, offset: int = 0, truncate: bool = True) -> dict[str, Any]:
    parts = split_path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
    fd = _open(parts, flags, create_dirs=True)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileOpError("invalid", f"{path!r} is not a regular file")
        os.fchown(fd, OWNER, OWNER)
        # the agent is root, but the files are the kernel user's: don't let them eat the
        # blocks ext4 reserves for root (the kernel itself would get ENOSPC there)
        vfs = os.fstatvfs(fd)
        if len(data) > vfs.f_bavail * vfs.f_frsize:
            raise FileOpError("no_space", "the kernel's disk is full")
        os.pwrite(fd, data, offset)
        os.fsync(fd)
        return {"size": os.fstat(fd).st_size}
    finally:
        os.close(fd)


def read(path: str, offset: int = 0, length: int = MAX_CHUNK) -> dict[str, Any]:
    parts = split_path(path)
    fd = _open(parts, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileOpError("invalid", f"{path!r} is not a regular file")
        data = os.pread(fd, min(length, MAX_CHUNK), offset)
        return {"size": st.st_size, "data": base64.b64encode(data).decode(), "mtime": st.st_mtime}
    finally:
        os.close(fd)


def delete(path: str) -> dict[str, Any]:
    parts = split_path(path)
    dfd = _open_parent(parts, create=False)
    try:
        st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(parts[-1], dir_fd=dfd)
        else:
            os.unlink(parts[-1], dir_fd=dfd)
        return {}
    finally:
        os.close(dfd)


def listdir(path: str) -> dict[str, Any]:
    parts = split_path(path) if path.strip("/.") else []
    fd = os.open(ROOT, os.O_RDONLY | os.O_DIRECTORY) if not parts else _open(parts, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries = []
        for name in os.listdir(fd):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
            entries.append({"name": name, "type": kind, "size": st.st_size, "mtime": st.st_mtime})
        return {"entries": sorted(entries, key=lambda e: e["name"])}
    finally:
        os.close(fd)


def handle(body: dict[str, Any]) -> dict[str, Any]:
    """Entry point for the agent's ``file`` op (runs in a worker thread)."""
    action = body.get("action")
    path = body.get("path", "")
    try:
        if action == "write":
            return write(path, base64.b64decode(body.get("data", "")), int(body.get("offset", 0)),
                         bool(body.get("truncate", True)))
        if action == "read":
            return read(path, int(body.get("offset", 0)), int(body.get("length", MAX_CHUNK)))
        if action == "delete":
            return delete(path)
        if action == "list":
            return listdir(path)
    except FileNotFoundError as exc:
        raise FileOpError("not_found", f"{path!r} does not exist") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise FileOpError("no_space", "the kernel's disk is full") from exc
        if exc.errno == errno.ENOTDIR:
            raise FileOpError("not_found", f"{path!r}: a parent is not a directory") from exc
        raise
    raise FileOpError("invalid", f"unknown file action {action!r}")
