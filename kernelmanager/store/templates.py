"""Templates (and the guest images they need) through the store: push after a bake, pull
instead of a build.

A template directory names absolute paths of its host: ``snapshot.json`` (its own files,
the image's kernel and initrd), ``disk.qcow2`` (backed by the image's ``rootfs.ext4``) and
``overlay.qcow2`` (backed by ``disk.qcow2``). So ``snapshot.json`` and ``overlay.qcow2``
are not pushed; the record travels in the manifest's ``meta`` and a pull rewrites it for
this host's cache, rebases ``disk.qcow2`` onto this host's copy of the image and makes a
new overlay, all in the temp directory before the rename.

A template's manifest records what a restore must match (``compat``): QEMU version, agent
protocol, accelerator, CPU model, memory, vCPUs, kernel command line, guest kernel
release, image id and preloads. Its id is the template id (a hash of the same facts), so
a host looks up exactly the template it would bake; when there is none, ``explain_miss``
says which facts differ from the templates of that name the store does have (baked under
TCG while this host runs KVM, another QEMU...), and the host bakes its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from guest.protocol import PROTOCOL_VERSION

from .. import paths
from ..image import GuestImage
from ..snapshots import Snapshot
from ..vm.qemu import MachineSpec
from .archive import Manifest, TransferStats, get_manifest, list_manifests, pull_dir, push_dir
from .backends import ObjectStore, StoreError

log = logging.getLogger(__name__)

TEMPLATE_FILES = ["disk.qcow2", "mem", "state"]


def compat_facts(machine: MachineSpec, qemu: str, image_id: str, preload: tuple[str, ...] | list[str],
                 kernel_release: str = "") -> dict[str, Any]:
    """What a restore must match, as recorded in (and compared against) a manifest."""
    return {"qemu": qemu, "protocol": PROTOCOL_VERSION, "accel": machine.accel, "cpu": machine.cpu(),
            "memory_mb": machine.memory_mb, "vcpus": machine.vcpus, "cmdline": machine.cmdline,
            "image": image_id, "preload": list(preload), "kernel_release": kernel_release}


def push_image(store: ObjectStore, image: GuestImage) -> TransferStats:
    names = sorted(p.name for p in image.path.iterdir() if p.is_file())
    return push_dir(store, "image", image.id, image.path, names,
                    compat={"kernel_release": image.kernel_release})


def push_template(store: ObjectStore, snap: Snapshot, image: GuestImage, name: str) -> TransferStats:
    """Push ``image`` (if the store lacks it) and the template ``snap`` of template ``name``."""
    push_image(store, image)
    compat = compat_facts(snap.machine, snap.qemu_version, snap.image_id,
                          snap.info.get("preload", []), image.kernel_release)
    return push_dir(store, "template", snap.path.name, snap.path, TEMPLATE_FILES, compat=compat,
                    meta={"name": name, "snapshot": snap.to_json()})


def _qemu_img(*args: str) -> None:
    try:
        subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        raise StoreError(f"qemu-img {' '.join(args)} failed: {str(detail).strip()}") from exc


def pull_image(store: ObjectStore, image_id: str, stats: TransferStats | None = None) -> GuestImage:
    dest = paths.cache_dir() / "images" / image_id
    if not (dest / "image.json").exists():
        manifest = get_manifest(store, "image", image_id)
        if manifest is None:
            raise StoreError(f"store {store.url}: image {image_id} is missing (a template names it)")
        pull_dir(store, manifest, dest, done_marker="image.json", stats=stats)
    return GuestImage.load(dest)


def pull_template(store: ObjectStore, manifest: Manifest, stats: TransferStats | None = None) -> Snapshot:
    """Pull the template ``manifest`` describes (and its image first, if missing) into this
    host's cache; returns it, restorable here."""
    image = pull_image(store, manifest.compat["image"], stats)
    dest = paths.templates_dir() / manifest.id
    record = manifest.meta["snapshot"]

    def finish(tmp: Path) -> None:
        _qemu_img("rebase", "-u", "-F", "raw", "-b", str(image.rootfs), str(tmp / "disk.qcow2"))
        snap = Snapshot.from_json(record)
        machine = dataclasses.replace(snap.machine, kernel=str(image.kernel), initrd=str(image.initrd))
        snap = dataclasses.replace(snap, path=dest, mem_file=dest / "mem", state_file=dest / "state",
                                   disk=dest / "disk.qcow2", machine=machine)
        size = _virtual_size(tmp / "disk.qcow2")
        _qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(dest / "disk.qcow2"), "-u",
                  "-o", "cluster_size=65536,lazy_refcounts=on", str(tmp / "overlay.qcow2"), str(size))
        # written into tmp, naming the final paths (the rename makes them true)
        (tmp / "snapshot.json").write_text(json.dumps(snap.to_json(), indent=1))

    pull_dir(store, manifest, dest, done_marker="snapshot.json", finish=finish, stats=stats)
    return Snapshot.load(dest)


def _virtual_size(path: Path) -> int:
    try:
        out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                             check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StoreError(f"cannot read {path}: {getattr(exc, 'stderr', exc)}") from exc
    return int(json.loads(out)["virtual-size"])


def explain_miss(store: ObjectStore, name: str, wanted: dict[str, Any]) -> str:
    """Why the store has no template for ``wanted`` (the facts this host would bake with)."""
    others = [m for m in list_manifests(store, "template") if m.meta.get("name") == name]
    if not others:
        return f"the store {store.url} has no template {name!r}"
    reasons = []
    for m in others[:3]:
        diff = [f"{k} {m.compat.get(k)!r} (this host: {v!r})" for k, v in wanted.items()
                if k != "kernel_release" and m.compat.get(k) != v]
        reasons.append(f"{m.id} differs in " + ", ".join(diff) if diff else f"{m.id} differs")
    return (f"the store {store.url} has {len(others)} template(s) {name!r}, none restorable "
            "here: " + "; ".join(reasons))
