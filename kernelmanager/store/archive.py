"""Directories as content-addressed chunks plus a manifest: push, pull, garbage-collect.

Layout in an ``ObjectStore``::

    chunks/<sha[:2]>/<sha256>        zlib-compressed 4 MiB piece of a file; the key is the
                                     SHA-256 of the *uncompressed* bytes
    manifests/<kind>/<id>.json       what one directory is: kind (image, template, fork),
                                     compatibility facts, and per file its size, mode and
                                     (offset, length, sha) of every non-zero chunk. A push
                                     without an id names it by its content: the SHA-256 of
                                     its file list and facts (a fork snapshot's id)

A push uploads the chunks the store lacks (zero chunks and file holes are skipped: a
template's 1 GiB RAM image is mostly zeros) and writes the manifest *last*, so a manifest
that exists names only chunks that exist. Identical chunks (the same image under two
templates, a fork of a template) are stored once.

A pull takes ``<dest>.lock`` (flock, the same lock the bake and image build hold), so
several pulls of one directory on a host wait for the first and then find it done: each
host downloads it once. Chunks go into ``<dest's parent>/.tmp-pull-<id>-<pid>``; each is
decompressed with a bound and checked against its SHA-256 before it is written, and only a
directory that is complete, verified and fixed up (``finish``) is renamed into place. A
corrupt chunk raises ``StoreCorrupt`` and leaves nothing behind.

``gc`` deletes chunks no manifest names, older than a grace period (a push in progress has
uploaded chunks whose manifest does not exist yet). Fork snapshots are transient (they carry
a fork from one host to others, which restore them at once): ``gc`` first drops fork
manifests older than ``fork_grace``, then their chunks go with the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import ObjectStore, StoreError

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
MANIFEST_FORMAT = 1
MAX_MANIFEST = 16 * 1024 * 1024
MAX_COMPRESSED = CHUNK + CHUNK // 16 + 1024   # zlib's worst case is a few bytes per 16 KiB
_ZERO = bytes(CHUNK)
WORKERS = 4


class StoreCorrupt(StoreError):
    """An object of the store failed verification (hash, size, format): not used."""


@dataclass
class TransferStats:
    files: int = 0
    chunks: int = 0              # chunks the directory has (non-zero)
    transferred: int = 0         # chunks actually uploaded or downloaded
    bytes: int = 0               # compressed bytes moved
    seconds: float = 0.0
    id: str = ""                 # the pushed directory's id (its content address if unnamed)


@dataclass
class Manifest:
    kind: str
    id: str
    files: list[dict[str, Any]]
    compat: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    host: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "kind": self.kind, "id": self.id, "created": self.created,
                "host": self.host, "compat": self.compat, "meta": self.meta, "files": self.files}

    @classmethod
    def parse(cls, data: bytes, key: str) -> Manifest:
        try:
            d = json.loads(data)
            if d.get("format") != MANIFEST_FORMAT:
                raise StoreCorrupt(f"manifest {key}: format {d.get('format')} is not {MANIFEST_FORMAT}")
            m = cls(kind=d["kind"], id=d["id"], files=d["files"], compat=d.get("compat", {}),
                    meta=d.get("meta", {}), created=d.get("created", 0.0), host=d.get("host", ""))
            for f in m.files:
                name = f["name"]
                if not isinstance(name, str) or "/" in name or name.startswith("."):
                    raise StoreCorrupt(f"manifest {key}: bad file name {name!r}")
                for off, length, sha in f["chunks"]:
                    if not (0 <= off and 0 < length <= CHUNK and off + length <= f["size"]
                            and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                        raise StoreCorrupt(f"manifest {key}: bad chunk entry in {name}")
            return m
        except StoreCorrupt:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreCorrupt(f"manifest {key} is unreadable: {exc}") from exc

    def chunk_keys(self) -> set[str]:
        return {chunk_key(sha) for f in self.files for _, _, sha in f["chunks"]}


def chunk_key(sha: str) -> str:
    return f"chunks/{sha[:2]}/{sha}"


def manifest_key(kind: str, id_: str) -> str:
    return f"manifests/{kind}/{id_}.json"


def get_manifest(store: ObjectStore, kind: str, id_: str) -> Manifest | None:
    key = manifest_key(kind, id_)
    data = store.get(key, MAX_MANIFEST)
    return None if data is None else Manifest.parse(data, key)


def list_manifests(store: ObjectStore, kind: str) -> list[Manifest]:
    out = []
    for key, _ in store.keys(f"manifests/{kind}/"):
        data = store.get(key, MAX_MANIFEST)
        if data is None:
            continue
        try:
            out.append(Manifest.parse(data, key))
        except StoreCorrupt as exc:
            log.warning("store %s: skipping %s", store.url, exc)
    return out


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The chunk-aligned offsets of ``fd`` that may hold data (holes skipped by SEEK_DATA)."""
    offsets: list[int] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        start = data - data % CHUNK
        for off in range(start, hole, CHUNK):
            if not offsets or off > offsets[-1]:
                offsets.append(off)
        pos = hole
    return [(off, min(CHUNK, size - off)) for off in offsets]


def content_id(files: list[dict[str, Any]], compat: dict[str, Any]) -> str:
    """The content address of a directory: SHA-256 of its file list (names, sizes, modes,
    chunk hashes) and compatibility facts."""
    return hashlib.sha256(json.dumps([files, compat], sort_keys=True).encode()).hexdigest()


def push_dir(store: ObjectStore, kind: str, id_: str | None, src: Path, names: list[str], *,
             compat: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> TransferStats:
    """Upload the files ``names`` of ``src`` as ``kind``/``id_`` (a no-op if the store has
    it; ``id_`` None: named by its content, ``stats.id``). Chunks first, manifest last."""
    stats = TransferStats(id=id_ or "")
    t0 = time.monotonic()
    if id_ is not None and store.exists(manifest_key(kind, id_)):
        return stats
    files: list[dict[str, Any]] = []
    counting = threading.Lock()   # the workers count into stats

    def one(path: Path, off: int, length: int) -> tuple[int, int, str] | None:
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(length)
        if data == _ZERO[:len(data)]:
            return None
        sha = hashlib.sha256(data).hexdigest()
        key = chunk_key(sha)
        if not store.exists(key):
            blob = zlib.compress(data, 1)
            store.put(key, blob)
            with counting:
                stats.transferred += 1
                stats.bytes += len(blob)
        return off, len(data), sha

    with ThreadPoolExecutor(WORKERS) as pool:
        for name in names:
            path = src / name
            st = path.stat()
            fd = os.open(path, os.O_RDONLY)
            try:
                ranges = _data_ranges(fd, st.st_size)
            finally:
                os.close(fd)
            chunks = [c for c in pool.map(lambda r, p=path: one(p, *r), ranges) if c is not None]
            stats.files += 1
            stats.chunks += len(chunks)
            files.append({"name": name, "size": st.st_size, "mode": st.st_mode & 0o777,
                          "chunks": [list(c) for c in chunks]})
    if id_ is None:
        id_ = stats.id = content_id(files, compat or {})
    manifest = Manifest(kind=kind, id=id_, files=files, compat=compat or {}, meta=meta or {},
                        created=time.time(), host=socket.gethostname())
    store.put(manifest_key(kind, id_), json.dumps(manifest.to_json()).encode())
    stats.seconds = time.monotonic() - t0
    log.info("store %s: pushed %s %s (%d files, %d chunks, %d new, %.1f MB in %.1f s)", store.url,
             kind, id_, stats.files, stats.chunks, stats.transferred, stats.bytes / 1e6, stats.seconds)
    return stats


def _fetch_chunk(store: ObjectStore, sha: str, length: int) -> bytes:
    key = chunk_key(sha)
    blob = store.get(key, MAX_COMPRESSED)
    if blob is None:
        raise StoreCorrupt(f"store {store.url}: chunk {sha[:16]} is missing")
    try:
        d = zlib.decompressobj()
        data = d.decompress(blob, length + 1)   # bounded: a bomb stops at length + 1 bytes
        if not d.eof:
            raise StoreCorrupt(f"store {store.url}: chunk {sha[:16]} is longer than {length} bytes")
    except zlib.error as exc:
        raise StoreCorrupt(f"store {store.url}: chunk {sha[:16]} does not decompress: {exc}") from exc
    if len(data) != length or hashlib.sha256(data).hexdigest() != sha:
        raise StoreCorrupt(f"store {store.url}: chunk {sha[:16]} is corrupt (its content does not "
                           "match its hash): refused")
    return data


def pull_dir(store: ObjectStore, manifest: Manifest, dest: Path, *, done_marker: str,
             finish: Callable[[Path], None] | None = None, stats: TransferStats | None = None) -> bool:
    """Download ``manifest`` into ``dest`` unless ``dest/done_marker`` already exists.
    Returns True if this call downloaded it. Holds ``<dest>.lock`` throughout; ``finish(tmp)``
    runs on the verified temp directory before the rename (path fix-ups)."""
    stats = stats if stats is not None else TransferStats()
    t0 = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(dest.parent / f"{dest.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if (dest / done_marker).exists():
            return False
        tmp = dest.parent / f".tmp-pull-{dest.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            with ThreadPoolExecutor(WORKERS) as pool:
                for f in manifest.files:
                    path = tmp / f["name"]
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        os.ftruncate(fd, f["size"])

                        def one(c: list[Any], fd: int = fd) -> int:
                            off, length, sha = c
                            data = _fetch_chunk(store, sha, length)
                            os.pwrite(fd, data, off)
                            return length

                        for n in pool.map(one, f["chunks"]):
                            stats.chunks += 1
                            stats.bytes += n
                    finally:
                        os.close(fd)
                    os.chmod(path, f.get("mode", 0o644) & 0o777)
                    stats.files += 1
            stats.transferred = stats.chunks
            if finish is not None:
                finish(tmp)
            if dest.exists():  # a leftover without its marker: incomplete, replace it
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        os.close(lock_fd)
    stats.seconds = time.monotonic() - t0
    log.info("store %s: pulled %s %s into %s (%d chunks, %.1f MB in %.1f s)", store.url,
             manifest.kind, manifest.id, dest, stats.chunks, stats.bytes / 1e6, stats.seconds)
    return True


@dataclass
class GCReport:
    manifests: int = 0
    chunks: int = 0
    deleted: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)   # fork manifests past fork_grace


def gc(store: ObjectStore, *, grace: float = 3600.0, fork_grace: float = 86400.0,
       dry_run: bool = False) -> GCReport:
    """Delete fork manifests older than ``fork_grace`` seconds, then the chunks no manifest
    names that are older than ``grace`` seconds."""
    report = GCReport()
    live: set[str] = set()
    now = time.time()
    for kind in ("image", "template", "fork"):
        for m in list_manifests(store, kind):
            if kind == "fork" and m.created < now - fork_grace:
                report.expired.append(manifest_key(kind, m.id))
                continue
            report.manifests += 1
            live |= m.chunk_keys()
    if not dry_run and report.expired:
        store.delete(report.expired)
    cutoff = time.time() - grace
    for key, mtime in store.keys("chunks/"):
        report.chunks += 1
        if key not in live and mtime <= cutoff:
            report.deleted.append(key)
    if not dry_run and report.deleted:
        store.delete(report.deleted)
    log.info("store %s: gc: %d manifests, %d chunks, %s %d unreferenced", store.url,
             report.manifests, report.chunks, "would delete" if dry_run else "deleted",
             len(report.deleted))
    return report


def delete_manifest(store: ObjectStore, kind: str, id_: str) -> None:
    """Forget ``kind``/``id_`` (its chunks go at the next ``gc``)."""
    store.delete([manifest_key(kind, id_)])
