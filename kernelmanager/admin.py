"""What an operator (the ``vmkg`` command line, a server at start and stop) does with the
runtime as a whole, as plain functions over the modules that do the work.

    start_runtime / stop_runtime   the process-wide runtime loop that owns every VM
                                   (start reaps what a crashed predecessor left; stop
                                   closes every VM of this process)
    bake_template                  build the image and bake a template if needed
    build_image                    build (or find) a template's guest image
    detect_accelerator             KVM or TCG, and why
    install_kernelspecs            Jupyter kernelspecs selecting the microVM provisioner
    prune_cache                    remove images and templates nothing resolves to
    store_gc                       delete the store's chunks no manifest names

Callers outside ``kernelmanager`` use these through the package root; the objects
behind them (``Runtime``, ``Snapshot``, ``GuestImage``) stay inside.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from . import accel as accel_mod
from . import cache, kernelspec, store
from .accel import AccelChoice
from .cache import PruneReport
from .exceptions import ConfigError
from .image import build_image as _build_image
from .runtime import Runtime
from .templates import ensure_template, get_spec


def start_runtime() -> None:
    """Start the runtime loop of this process (idempotent). Reaps, first of all, the VM
    and fork directories (and their QEMU processes) whose owner process is gone."""
    Runtime.instance()
    from .net.slots import prewarm  # network slots prepared ahead (kernelmanager.net)
    prewarm()


def stop_runtime(timeout: float = 10.0) -> None:
    """Close every VM this process still holds and stop the runtime loop. Blocking (run
    it in a thread from async code); a later call to anything VM-related starts a new
    runtime."""
    if Runtime._instance is not None:
        Runtime._instance.shutdown(timeout)
    from .net.slots import close_pool  # the network slots prepared ahead (kernelmanager.net)
    close_pool()


async def bake_template(template: str = "python3", accel: str | None = None,
                        progress: Callable[[str], None] | None = None) -> Path:
    """Make the named template ready: build its image and bake it unless cached (minutes
    the first time, milliseconds after). Returns the template's directory. Runs on the
    runtime loop; awaitable from any loop. Raises ``ConfigError`` (unknown template, bad
    accelerator), ``ImageError`` or ``TemplateError``."""
    spec = get_spec(template)
    snap = await Runtime.instance().run(ensure_template(spec, accel, progress=progress))
    return snap.path


def build_image(template: str = "python3", *, force: bool = False) -> Path:
    """Build (or find) the guest image of the named template; returns its directory.
    Blocking; needs root for a real build. Raises ``ImageError`` (an
    ``ImageBuildError`` with a hint and the build log's path) or ``ConfigError``."""
    return _build_image(get_spec(template).recipe(), force=force).path


def detect_accelerator(preference: str | None = None) -> AccelChoice:
    """``kvm`` or ``tcg`` and the reason (``preference``: auto, kvm, tcg; default
    ``$VMKG_ACCEL`` or auto). Raises ``ConfigError`` for kvm without a usable /dev/kvm."""
    return accel_mod.detect(preference)


def install_kernelspecs(template: str | None = None, *, user: bool = False,
                        prefix: str | None = None) -> list[str]:
    """Install the kernelspecs of every template (or one); returns the directories."""
    return kernelspec.install(template, user=user, prefix=prefix)


def prune_cache(dry_run: bool = False) -> PruneReport:
    """Remove images and templates no current template resolves to and nothing uses."""
    return cache.prune(dry_run=dry_run)


def store_gc(grace: float = 3600.0, dry_run: bool = False) -> store.GCReport:
    """Delete the configured store's chunks that no manifest names and that are older than
    ``grace`` seconds (younger ones may belong to a push in progress). Raises ConfigError
    when no store is configured, StoreError when it cannot be read."""
    shared = store.current()
    if shared is None:
        raise ConfigError("no store configured: set $VMKG_STORE or --store (s3://BUCKET/PREFIX or a directory)")
    return store.gc(shared, grace=grace, dry_run=dry_run)
