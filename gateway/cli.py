"""The ``vmkg`` subcommands other than ``serve``: image, template, kernelspec, cache, store.

Each is a small traitlets Application, so ``--help`` and ``--help-all`` explain it
and every option is also settable in the config file. The operator commands (image,
template, kernelspec, cache) call the operator functions of ``kernelmanager``'s root. ``run`` and ``fork`` talk to a
gateway as clients: they are the client distribution's command (``vmkg_client.cli``,
also installed as ``vmkg-client``), reached through :class:`_ClientCommand`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from traitlets import Bool, Float, Unicode
from traitlets.config import Application

from kernelmanager import (
    bake_template,
    build_image,
    catalog,
    configure_store,
    detect_accelerator,
    install_kernelspecs,
    kernelspec_name,
    prune_cache,
    store_gc,
)
from kernelmanager.exceptions import ImageError, VMKGError


class _Sub(Application):
    def fail(self, msg: str) -> None:
        print(f"vmkg: error: {msg}", file=sys.stderr)
        self.exit(1)


class _Group(_Sub):
    """A command whose work is done by one of its subcommands."""

    def start(self) -> None:
        if self.subapp is None:
            self.print_help()
            self.exit(2)
        assert self.subapp is not None
        self.subapp.start()


class ImageBuildApp(_Sub):
    name = "vmkg image build"
    description = ("Build the guest image of a template (Debian cloud kernel, busybox initramfs, "
                   "debootstrap root with Python, ipykernel and the template's pip packages). "
                   "Cached by a hash of its recipe: a second build is a no-op. Needs root.")
    template = Unicode("python3", config=True, help="Template whose image to build.")
    force = Bool(False, config=True, help="Rebuild even if the image is cached.")
    aliases = {"template": "ImageBuildApp.template"}
    flags = {"force": ({"ImageBuildApp": {"force": True}}, "Rebuild even if cached.")}

    def start(self) -> None:
        try:
            path = build_image(self.template, force=self.force)
        except ImageError as exc:
            log = getattr(exc, "log", None)  # an ImageBuildError keeps the build log
            self.fail(f"{exc}" + (f" (full log: {log})" if log else ""))
            return
        except VMKGError as exc:
            self.fail(str(exc))
            return
        print(path)


class ImageApp(_Group):
    name = "vmkg image"
    description = "Guest images."
    subcommands = {"build": (ImageBuildApp, ImageBuildApp.description.splitlines()[0])}



class TemplateBakeApp(_Sub):
    name = "vmkg template bake"
    description = ("Cold-boot a template's image once, wait until ipykernel answers, and snapshot "
                   "the VM (memory, device state, disk) as an immutable template. Builds the image "
                   "first if needed. Cached: baking an unchanged template is a no-op.")
    template = Unicode("python3", config=True, help="Template to bake.")
    accel = Unicode("", config=True, help="auto, kvm or tcg (default: $VMKG_ACCEL or auto).")
    aliases = {"template": "TemplateBakeApp.template", "accel": "TemplateBakeApp.accel"}

    def start(self) -> None:
        try:
            choice = detect_accelerator(self.accel or None)
            print(f"vmkg: accelerator {choice.name} ({choice.reason})", file=sys.stderr)
            t0 = time.monotonic()
            path = asyncio.run(bake_template(self.template, choice.name,
                                             progress=lambda m: print(f"vmkg: {m}", file=sys.stderr)))
        except VMKGError as exc:
            self.fail(str(exc))
            return
        print(f"vmkg: template {self.template} ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        print(path)


class TemplateListApp(_Sub):
    name = "vmkg template list"
    description = "List the templates of the catalog (built-in plus $VMKG_TEMPLATES)."

    def start(self) -> None:
        for name, spec in sorted(catalog().items()):
            print(json.dumps({"name": name, "kernelspec": kernelspec_name(name),
                              "packages": spec.packages, "memory_mb": spec.memory_mb,
                              "vcpus": spec.vcpus, "preload": spec.preload}))


class TemplateApp(_Group):
    name = "vmkg template"
    description = "Templates: warm VM snapshots kernels are restored from."
    subcommands = {
        "bake": (TemplateBakeApp, "Bake a template (cold boot + snapshot)."),
        "list": (TemplateListApp, "List templates."),
    }



class KernelspecInstallApp(_Sub):
    name = "vmkg kernelspec install"
    description = ("Install Jupyter kernelspecs (e.g. python3-microvm) that run kernels in microVMs "
                   "through the 'microvm' kernel provisioner.")
    user = Bool(False, config=True, help="Install for the current user instead of system-wide.")
    prefix = Unicode("", config=True, help="Install under this prefix (e.g. sys.prefix).")
    template = Unicode("", config=True, help="Only this template's kernelspec (default: all).")
    aliases = {"prefix": "KernelspecInstallApp.prefix", "template": "KernelspecInstallApp.template"}
    flags = {
        "user": ({"KernelspecInstallApp": {"user": True}}, "Install for the current user."),
        "sys-prefix": ({"KernelspecInstallApp": {"prefix": sys.prefix}}, f"Install into {sys.prefix}."),
    }

    def start(self) -> None:
        try:
            for d in install_kernelspecs(self.template or None, user=self.user, prefix=self.prefix or None):
                print(d)
        except VMKGError as exc:
            self.fail(str(exc))


class KernelspecApp(_Group):
    name = "vmkg kernelspec"
    description = "Jupyter kernelspecs for the microVM provisioner."
    subcommands = {"install": (KernelspecInstallApp, "Install the kernelspecs.")}



class CachePruneApp(_Sub):
    name = "vmkg cache prune"
    description = ("Remove guest images and templates that no current template recipe resolves to "
                   "(every agent or recipe change leaves the old ones behind). Spares images and "
                   "templates being built and anything a running VM uses.")
    dry_run = Bool(False, config=True, help="Only say what would be removed.")
    flags = {"dry-run": ({"CachePruneApp": {"dry_run": True}}, "Only say what would be removed.")}

    def start(self) -> None:
        try:
            report = prune_cache(dry_run=self.dry_run)
        except (OSError, VMKGError) as exc:
            self.fail(str(exc))
            return
        verb = "would remove" if self.dry_run else "removed"
        for p in report.removed:
            print(f"{verb} {p}")
        print(f"vmkg: {verb} {len(report.removed)}, kept {len(report.kept)}, "
              f"{report.freed_bytes / 2**30:.1f} GB freed", file=sys.stderr)


class CacheApp(_Group):
    name = "vmkg cache"
    description = "The image and template cache ($VMKG_CACHE_DIR, /var/cache/vmkg as root)."
    subcommands = {"prune": (CachePruneApp, "Remove images and templates no longer used.")}



class StoreGCApp(_Sub):
    name = "vmkg store gc"
    description = ("Delete the snapshot store's chunks that no manifest names (templates, images "
                   "and forks the store still has keep theirs). Chunks younger than --grace are "
                   "spared: a push in progress uploads its chunks before its manifest.")
    store = Unicode("", config=True, help="The store (s3://BUCKET/PREFIX or a directory); "
                                          "default $VMKG_STORE.")
    grace = Float(3600.0, config=True, help="Seconds an unreferenced chunk must have existed.")
    dry_run = Bool(False, config=True, help="Only say what would be deleted.")
    aliases = {"store": "StoreGCApp.store", "grace": "StoreGCApp.grace"}
    flags = {"dry-run": ({"StoreGCApp": {"dry_run": True}}, "Only say what would be deleted.")}

    def start(self) -> None:
        try:
            if self.store:
                configure_store(self.store)
            report = store_gc(grace=self.grace, dry_run=self.dry_run)
        except VMKGError as exc:
            self.fail(str(exc))
            return
        verb = "would delete" if self.dry_run else "deleted"
        print(f"vmkg: {report.manifests} manifests, {report.chunks} chunks; {verb} "
              f"{len(report.deleted)} unreferenced", file=sys.stderr)


class StoreApp(_Group):
    name = "vmkg store"
    description = "The snapshot store shared by hosts ($VMKG_STORE)."
    subcommands = {"gc": (StoreGCApp, "Delete chunks no manifest names.")}


class _ClientCommand(Application):
    """``vmkg run``/``vmkg fork``: the client's own command (``vmkg_client.cli``, argparse),
    its arguments passed through untouched, so both commands take the same options and
    exit with the same statuses."""

    command = ""

    def initialize(self, argv: list[str] | None = None) -> None:
        self.client_argv = list(sys.argv[1:] if argv is None else argv)

    def start(self) -> None:
        from vmkg_client.cli import main

        main([self.command, *self.client_argv], prog="vmkg")


class ForkApp(_ClientCommand):
    name = "vmkg fork"
    description = ("Fork a running kernel of a gateway into N new kernels that continue from its "
                   "exact state: vmkg fork KERNEL_ID -n 4 (options: vmkg fork --help).")
    command = "fork"


class HibernateApp(_ClientCommand):
    name = "vmkg hibernate"
    description = "Hibernate a kernel of a gateway to disk: vmkg hibernate KERNEL_ID."
    command = "hibernate"


class WakeApp(_ClientCommand):
    name = "vmkg wake"
    description = "Wake a hibernated kernel of a gateway: vmkg wake KERNEL_ID."
    command = "wake"


class CheckpointApp(_ClientCommand):
    name = "vmkg checkpoint"
    description = ("Named checkpoints of a kernel: vmkg checkpoint KERNEL_ID [save|list|restore|"
                   "delete] NAME (options: vmkg checkpoint --help).")
    command = "checkpoint"


class RunApp(_ClientCommand):
    name = "vmkg run"
    description = ("Run one cell in a fresh or running kernel of a gateway and print its outputs: "
                   "vmkg run 'print(1)' (options: vmkg run --help).")
    command = "run"
