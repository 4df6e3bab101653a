"""Pruning the image and template cache.

Every change to a recipe or to the guest sources makes a new image (~0.5 GB) and a new
template (~0.1-0.4 GB); the old ones stay until pruned. ``prune()`` keeps the images
and templates the current catalog resolves to and removes the rest, skipping anything
whose lock is held (a build or bake in progress) and any template a running QEMU process of this
host maps or holds open (a VM restored from it, or from a fork of such a VM).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .snapshots import Snapshot
from .templates import catalog

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    freed_bytes: int = 0


def _size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _locked(lock: Path) -> bool:
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _files_in_use() -> set[str]:
    """Files running QEMU processes map (RAM images) or hold open (disk chains)."""
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("qemu-system"):
                    continue
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    fields = line.split(maxsplit=5)  # anonymous mappings have no 6th field
                    if len(fields) == 6:
                        used.add(fields[5].strip())
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
        except OSError:
            continue
    return used


def prune(dry_run: bool = False) -> PruneReport:
    report = PruneReport()
    cache = paths.cache_dir()
    keep_images = {spec.recipe().digest() for spec in catalog().values()}
    images, templates = cache / "images", cache / "templates"
    used = _files_in_use()

    def remove(path: Path) -> None:
        report.freed_bytes += _size(path)
        report.removed.append(path)
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
            path.with_name(path.name + ".lock").unlink(missing_ok=True)

    for d in sorted(templates.iterdir()) if templates.is_dir() else []:
        if not d.is_dir() or d.name == "logs":
            continue
        try:
            snap = Snapshot.load(d)
            in_use = snap.image_id in keep_images or any(u.startswith(f"{d}/") for u in used)
        except Exception:  # noqa: BLE001 - an unreadable template is garbage
            in_use = False
        if in_use or _locked(templates / f"{d.name}.lock"):
            report.kept.append(d)
        else:
            remove(d)
    live_images = {Snapshot.load(d).image_id for d in report.kept if (d / "snapshot.json").exists()}
    for d in sorted(images.iterdir()) if images.is_dir() else []:
        if not d.is_dir():
            continue
        name = d.name.split("-")[1] if d.name.startswith(".tmp-") else d.name
        if name in keep_images or name in live_images or _locked(images / f"{name}.lock"):
            report.kept.append(d)
        else:
            remove(d)
    log.info("cache prune: removed %d, kept %d, freed %.1f GB", len(report.removed), len(report.kept),
             report.freed_bytes / 2**30)
    return report
