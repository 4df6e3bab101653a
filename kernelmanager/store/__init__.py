"""The snapshot store: templates, their guest images and fork snapshots shared between hosts.

One interface (``backends.ObjectStore``), two implementations: a local directory and S3
(boto3; endpoint and credentials from the standard AWS settings such as
``AWS_ENDPOINT_URL``). The store is chosen by a URL: ``s3://bucket/prefix``, ``file:///dir``
or a directory path; ``vmkg serve --store=URL`` or ``$VMKG_STORE``. With no store
configured, nothing is pushed or pulled and each host builds and bakes its own.

    backends    ObjectStore (put/get/exists/keys/delete), LocalStore, S3Store, open_store
    archive     directories as content-addressed, compressed chunks + a manifest; pull
                with integrity checks into a temp dir renamed into place under a flock;
                garbage collection of unreferenced chunks
    templates   templates and images: push after a bake, pull (with path fix-ups for this
                host) instead of a build, and why a store's templates don't fit this host

Who calls it: ``kernelmanager.templates.ensure_template`` (through :func:`fetch_template`
and :func:`publish`), and the operator commands through the package root
(``configure_store``, ``store_gc``).
"""

from __future__ import annotations

import logging
import os

from ..image import GuestImage
from ..snapshots import Snapshot
from .archive import GCReport, StoreCorrupt, TransferStats, gc, get_manifest
from .backends import LocalStore, ObjectStore, S3Store, StoreError, open_store
from .templates import compat_facts, explain_miss, pull_template, push_template

__all__ = ["ObjectStore", "LocalStore", "S3Store", "StoreError", "StoreCorrupt", "open_store",
           "configure", "current", "fetch_template", "publish", "gc", "GCReport", "TransferStats"]

log = logging.getLogger(__name__)

_configured: list[ObjectStore | None] = []


def configure(url: str | None) -> ObjectStore | None:
    """Use the store at ``url`` in this process ("" or None: none). Raises ConfigError."""
    store = open_store(url) if url else None
    _configured[:] = [store]
    return store


def current() -> ObjectStore | None:
    """The configured store; unless ``configure`` was called, the one ``$VMKG_STORE`` names."""
    if not _configured:
        configure(os.environ.get("VMKG_STORE", ""))
    return _configured[0]


def fetch_template(store: ObjectStore, name: str, tid: str, wanted: dict[str, object]) -> Snapshot | None:
    """Template ``tid`` pulled from ``store`` into this host's cache, or None (logged with
    the reason) when the store has none that fits or its copy is unusable: the caller bakes."""
    try:
        manifest = get_manifest(store, "template", tid)
        if manifest is None:
            log.warning("template %s: not pulled: %s; baking one on this host", name,
                        explain_miss(store, name, wanted))
            return None
        differs = {k: v for k, v in wanted.items()
                   if k != "kernel_release" and manifest.compat.get(k) != v}
        if differs:
            log.warning("template %s: the store's %s does not match this host (%s); baking one here",
                        name, tid, ", ".join(f"{k}: {manifest.compat.get(k)!r} vs {v!r}"
                                             for k, v in differs.items()))
            return None
        log.info("template %s: pulling %s from the store %s", name, tid, store.url)
        stats = TransferStats()
        snap = pull_template(store, manifest, stats)
        log.info("template %s: pulled %s (%.0f MB, %.1f s)", name, tid, stats.bytes / 1e6, stats.seconds)
        return snap
    except StoreError as exc:
        log.error("template %s: cannot pull %s from the store: %s; baking one on this host",
                  name, tid, exc)
        return None


def publish(store: ObjectStore, snap: Snapshot, image: GuestImage, name: str) -> None:
    """Push template ``snap`` (and its image) unless the store has it; failures are logged,
    not raised (this host's own kernels don't need the store)."""
    try:
        if get_manifest(store, "template", snap.path.name) is None:
            log.info("template %s: pushing %s to the store %s", name, snap.path.name, store.url)
            push_template(store, snap, image, name)
    except (StoreError, OSError) as exc:
        log.error("template %s: cannot push %s to the store %s: %s", name, snap.path.name,
                  store.url, exc)


__all__ += ["compat_facts"]
