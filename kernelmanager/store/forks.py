"""Fork snapshots through the store: how a fork's branches restore on other hosts.

What travels is a *durable image* (``kernelmanager.durable``): the RAM pages that differ
from the template (``mem.delta``), the device state, and the disk as one qcow2 layer over
the template's disk. It depends on nothing but its template, so a host that has the same
template restores it exactly as it would wake a hibernated kernel.

``push_fork`` uploads an image as a ``fork`` manifest named by its content (the SHA-256
of its chunk list and facts; ``archive.push_dir`` without an id). Its ``compat`` is the
template's (QEMU, agent protocol, accelerator, CPU model, memory, vCPUs, kernel command
line, image, preloads) plus the template id, its ``meta`` the parent kernel, the owner
(a pull for another user finds nothing), the template's name and the delta's size.

``pull_fork`` is the other end: the fork manifest must name exactly the template this host
restores kernels of that template from (same id, same facts: a fork made under TCG never
restores under KVM, nor on another QEMU), or it raises ``TemplateIncompatible`` saying
which facts differ. The chunks are verified as every pull's (``StoreCorrupt``: nothing is
used), the disk layer is rebased onto this host's copy of the template disk and the image
record written, all in the temp directory before the rename.

The RAM delta's *holes* mean something (a hole: the template's page; data, even zeros: the
kernel's page), but chunks drop zeros and a pulled chunk is dense. So the delta's data
ranges travel in the manifest (``meta["delta_extents"]``) and a pull rebuilds the file
from them: exactly those ranges as data (zeros included), holes elsewhere.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from ..durable import DELTA, DurableImage, data_ranges
from ..exceptions import TemplateIncompatible
from ..snapshots import Snapshot
from .archive import CHUNK, StoreCorrupt, TransferStats, get_manifest, pull_dir, push_dir
from .backends import ObjectStore, StoreError
from .templates import compat_facts

log = logging.getLogger(__name__)

FORK_FILES = ["state", "disk.qcow2", DELTA]


def template_facts(template: Snapshot) -> dict[str, Any]:
    """What a fork's restore must match: the template's facts and its id."""
    facts = compat_facts(template.machine, template.qemu_version, template.image_id,
                         template.info.get("preload", []))
    facts.pop("kernel_release", None)
    facts["template"] = template.path.name
    return facts


def push_fork(store: ObjectStore, image: DurableImage, template: Snapshot, *,
              parent_id: str, template_name: str, owner: str = "") -> TransferStats:
    """Upload the durable image of a fork; ``stats.id`` is its content address."""
    fd = os.open(image.path / DELTA, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = data_ranges(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    stats = push_dir(store, "fork", None, image.path, FORK_FILES, compat=template_facts(template),
                     meta={"parent_id": parent_id, "template_name": template_name, "owner": owner,
                           "delta_bytes": image.delta_bytes, "created": image.created,
                           "delta_extents": [list(e) for e in extents]})
    log.info("kernel %s: fork snapshot %s pushed to %s (%.1f MB new in %.1f s)", parent_id,
             stats.id[:12], store.url, stats.bytes / 1e6, stats.seconds)
    return stats


def _check_id(fork_id: str) -> str:
    if len(fork_id) != 64 or any(c not in "0123456789abcdef" for c in fork_id):
        raise StoreError(f"{fork_id!r} is not a fork snapshot id (64 hex digits)")
    return fork_id


def pull_fork(store: ObjectStore, fork_id: str, template: Snapshot, dest: Path,
              stats: TransferStats | None = None, owner: str | None = None) -> DurableImage:
    """Download fork snapshot ``fork_id`` into ``dest`` (new) as a durable image over this
    host's ``template``. ``owner``: only a snapshot pushed for that owner (None: any).
    Raises StoreError (missing), StoreCorrupt, TemplateIncompatible."""
    manifest = get_manifest(store, "fork", _check_id(fork_id))
    if manifest is None or owner is not None and manifest.meta.get("owner", "") != owner:
        raise StoreError(f"store {store.url}: there is no fork snapshot {fork_id[:12]}"
                         + (f" of user {owner!r}" if owner else ""))
    wanted = template_facts(template)
    differs = {k: (manifest.compat.get(k), v) for k, v in wanted.items() if manifest.compat.get(k) != v}
    if differs:
        raise TemplateIncompatible(
            f"fork snapshot {fork_id[:12]} cannot restore on this host: " + ", ".join(
                f"{k} {theirs!r} (this host: {ours!r})" for k, (theirs, ours) in differs.items()))
    if {f["name"] for f in manifest.files} != set(FORK_FILES):
        raise StoreError(f"fork snapshot {fork_id[:12]} does not hold {', '.join(FORK_FILES)}")
    meta = manifest.meta

    size = next(f["size"] for f in manifest.files if f["name"] == DELTA)
    extents = _extents(meta.get("delta_extents"), size, fork_id)

    def finish(tmp: Path) -> None:
        _rebuild_delta(tmp / DELTA, extents, size)
        try:
            subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(template.disk),
                            str(tmp / "disk.qcow2")], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise StoreError(f"fork snapshot {fork_id[:12]}: cannot rebase its disk: "
                             f"{getattr(exc, 'stderr', '') or exc}") from exc
        DurableImage(path=tmp, kernel_id=str(meta.get("parent_id", "")), name=f"fork-{fork_id[:12]}",
                     created=float(meta.get("created") or manifest.created), template=template.path,
                     delta_bytes=int(meta.get("delta_bytes") or 0), info={"fork": fork_id}).save()

    pull_dir(store, manifest, dest, done_marker="image.json", finish=finish, stats=stats)
    image = DurableImage.load(dest)
    image.path = dest
    return image


def _extents(raw: Any, size: int, fork_id: str) -> list[tuple[int, int]]:
    """The delta's data ranges from a manifest, checked: sorted, disjoint, within the file."""
    out: list[tuple[int, int]] = []
    try:
        for start, end in raw:
            if not (isinstance(start, int) and isinstance(end, int)
                    and (out[-1][1] if out else 0) <= start < end <= size):
                raise ValueError
            out.append((start, end))
    except (TypeError, ValueError) as exc:
        raise StoreCorrupt(f"fork snapshot {fork_id[:12]}: bad RAM delta extents") from exc
    return out


def _rebuild_delta(path: Path, extents: list[tuple[int, int]], size: int) -> None:
    """Rewrite the pulled (dense) delta with exactly ``extents`` as data, holes elsewhere."""
    new = path.with_name(".delta.rebuilt")
    with open(path, "rb", buffering=0) as src:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            for start, end in extents:
                for pos in range(start, end, CHUNK):
                    n = min(CHUNK, end - pos)
                    data = os.pread(src.fileno(), n, pos)
                    if len(data) != n or os.pwrite(fd, data, pos) != n:
                        raise StoreCorrupt(f"short read or write rebuilding {path.name}")
        finally:
            os.close(fd)
    os.replace(new, path)
