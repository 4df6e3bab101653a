"""Where the store's objects live: one small interface, two implementations.

``ObjectStore`` is a flat key-value space of immutable objects (``put``/``get``/``exists``/
``list``/``delete``), the least S3 and a directory have in common. Keys are ``/``-separated
(``chunks/ab/ab12...``, ``manifests/template/<id>.json``). Everything above it (chunking,
manifests, integrity, garbage collection) is in ``kernelmanager.store.archive`` and works the
same on both.

- ``LocalStore``: a directory (a shared mount, or just another disk). A ``put`` writes a temp
  file and renames it, so a reader never sees half an object.
- ``S3Store``: a bucket and prefix through boto3. Endpoint, region and credentials come from
  the standard AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, profiles, instance
  roles...), so any S3-compatible server works. S3 PUTs are atomic per object.

``open_store(url)``: ``s3://bucket/prefix`` is S3; ``file:///path`` or a plain path is local.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from ..exceptions import ConfigError, TemplateError


class StoreError(TemplateError):
    """The store cannot be read or written (network, permissions, a missing bucket)."""


class ObjectStore(Protocol):
    """A flat space of immutable objects. Implementations must be thread-safe: transfers
    run a few requests at once."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, atomically (readers see all or nothing)."""

    def get(self, key: str, limit: int) -> bytes | None:
        """The object, or None if there is none. More than ``limit`` bytes: StoreError."""

    def exists(self, key: str) -> bool: ...

    def keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modification time) of every object whose key starts with ``prefix``."""

    def delete(self, keys: list[str]) -> None: ...


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"store {self.root}: cannot create it: {exc}") from exc

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"store {self.url}: bad key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{threading.get_ident()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"store {self.url}: cannot write {key}: {exc}") from exc

    def get(self, key: str, limit: int) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"store {self.url}: cannot read {key}: {exc}") from exc
        if len(data) > limit:
            raise StoreError(f"store {self.url}: {key} is larger than {limit} bytes: refused")
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if key.startswith(prefix):
                    try:
                        yield key, os.stat(full).st_mtime
                    except FileNotFoundError:
                        continue

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)


class S3Store:
    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        # boto3 reads AWS_ENDPOINT_URL, credentials and region the standard way
        self.client = client or boto3.client(
            "s3", config=Config(max_pool_connections=16, retries={"max_attempts": 3, "mode": "standard"}))
        from botocore.exceptions import BotoCoreError, ClientError
        self._errors = (BotoCoreError, ClientError)

    def _fail(self, what: str, exc: Exception) -> StoreError:
        return StoreError(f"store {self.url}: {what}: {exc}")

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except self._errors as exc:
            raise self._fail(f"cannot write {key}", exc) from exc

    def get(self, key: str, limit: int) -> bytes | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except self._errors as exc:
            if _s3_code(exc) in ("NoSuchKey", "404"):
                return None
            raise self._fail(f"cannot read {key}", exc) from exc
        if obj.get("ContentLength", 0) > limit:
            obj["Body"].close()
            raise StoreError(f"store {self.url}: {key} is larger than {limit} bytes: refused")
        try:
            data: bytes = obj["Body"].read(limit + 1)
        except self._errors as exc:
            raise self._fail(f"cannot read {key}", exc) from exc
        finally:
            obj["Body"].close()
        if len(data) > limit:
            raise StoreError(f"store {self.url}: {key} is larger than {limit} bytes: refused")
        return data

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True
        except self._errors as exc:
            if _s3_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._fail(f"cannot look up {key}", exc) from exc

    def keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix):], obj["LastModified"].timestamp()
        except self._errors as exc:
            raise self._fail(f"cannot list {prefix}", exc) from exc

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self.prefix + k} for k in keys[i:i + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except self._errors as exc:
                raise self._fail("cannot delete objects", exc) from exc


def _s3_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def open_store(url: str) -> ObjectStore:
    """``s3://bucket[/prefix]``: S3 (boto3); ``file:///path`` or a path: a local directory."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"store {url!r}: no bucket; use s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme else url))
    raise ConfigError(f"store {url!r}: unknown scheme {parsed.scheme!r}; use s3://BUCKET/PREFIX "
                      "or a directory")


def now() -> float:
    return time.time()
