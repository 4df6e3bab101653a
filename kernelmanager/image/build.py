"""Build (or find) the guest image a recipe describes: kernel, initramfs, ext4 root.

Who calls it: the kernel manager asks :func:`find_image`/:func:`build_image` for the
image its template VM boots; people run ``python -m kernelmanager.image build`` (or ``vmkg image build``).

Cache layout (``cache_dir()``, one per host)::

    images/<id>/            a finished image: vmlinuz, initrd.img, rootfs.ext4,
                            kernel.config, image.json, build.log
    images/<id>.lock        flock held while <id> is being built
    images/.tmp-<id>-<pid>  a build in progress; renamed to images/<id> when complete
    bases/<key>.tar.zst     debootstrap + pip root tree, shared by every image whose
    bases/<key>.json        suite, mirror and packages match (json written last)
    downloads/debs, downloads/wheels   fetched .debs and wheels, reused across builds
    logs/<id>.failed.log    the log of the last failed build of <id>

The image id is :meth:`ImageRecipe.digest`: it covers the recipe, the builder's sources
(``kernelmanager/image/*.py`` and ``files/``) and the agent's sources (``guest/*.py``, the
only code that ships into the VM), so editing either yields a new image, made from the
cached base in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..paths import cache_dir
from . import cmdline, disk, initramfs, kernel, rootfs, wheels
from .errors import ImageBuildError
from .progress import Progress
from .runner import CommandFailed, Runner, check_host, disk_full, remove_tree

__all__ = [
    "GuestImage",
    "ImageBuildError",
    "ImageRecipe",
    "Progress",
    "build_image",
    "cache_dir",
    "find_image",
    "main",
]

BUILDER_DIR = Path(__file__).resolve().parent


def _guest_package_dir() -> Path:
    """The ``guest`` package's directory (found, not imported: the agent's modules expect
    to run in the VM)."""
    spec = importlib.util.find_spec("guest")
    if spec is None or not spec.submodule_search_locations:
        raise ImageBuildError("the guest package (the agent) is not installed",
                              "install vm-kernel-gateway completely")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


GUEST_SRC = _guest_package_dir()
FORMAT = 1
CMDLINE = cmdline.BASE
"""Kernel command line the image is made for; see :func:`cmdline.kernel_cmdline`."""


@dataclass(frozen=True)
class ImageRecipe:
    """What goes into a guest image. Frozen: its :meth:`digest` is the image id."""

    packages: tuple[str, ...] = ("ipykernel", "numpy", "pandas", "matplotlib")
    """Extra pip requirements for the guest (ipykernel, pyzmq and orjson are always included)."""
    debian_suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    disk_size_mb: int = 2048
    """Virtual size of the sparse ext4 root image."""

    def __post_init__(self) -> None:
        if isinstance(self.packages, str) or not isinstance(self.packages, tuple):
            raise TypeError("ImageRecipe.packages must be a tuple of requirement strings")
        if self.disk_size_mb < 256:
            raise ValueError("ImageRecipe.disk_size_mb must be at least 256")

    def requirements(self) -> list[str]:
        """Everything pip installs in the guest: ipykernel, pyzmq, orjson, then ``packages``."""
        return wheels.requirements(self.packages)

    def digest(self, guest_src: Path | None = None) -> str:
        """The image id: sha256 (16 hex digits) of the recipe and every source it uses.

        ``guest_src`` is the directory whose ``*.py`` files are the agent (default: the
        ``guest`` package this builder belongs to).
        """
        h = hashlib.sha256()
        fields = {**asdict(self), "packages": sorted(self.requirements()), "format": FORMAT}
        h.update(json.dumps(fields, sort_keys=True).encode())
        files = sorted(p for p in (BUILDER_DIR / "files").iterdir() if p.is_file())
        sources = [*sorted(BUILDER_DIR.glob("*.py")), *files]
        for label, paths in (
            ("builder", sources),
            ("guest", disk.guest_sources(guest_src or GUEST_SRC)),
        ):
            for path in paths:
                h.update(f"\0{label}/{path.name}\0".encode() + path.read_bytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class GuestImage:
    """A finished image directory, as described by its ``image.json``."""

    id: str
    path: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_release: str
    python_version: str
    packages: tuple[str, ...] = field(default=())

    @classmethod
    def load(cls, path: Path) -> GuestImage:
        """Read ``path/image.json``; ImageBuildError if it is missing, corrupt or incomplete."""
        path = Path(path)
        try:
            meta = json.loads((path / "image.json").read_text())
            image = cls(
                id=meta["id"],
                path=path,
                kernel=path / meta["kernel"],
                initrd=path / meta["initrd"],
                rootfs=path / meta["rootfs"],
                kernel_release=meta["kernel_release"],
                python_version=meta["python_version"],
                packages=tuple(meta["packages"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageBuildError(
                f"{path} is not a usable guest image ({exc})", "rebuild it with --force"
            ) from exc
        for file in (image.kernel, image.initrd, image.rootfs):
            if not file.is_file():
                raise ImageBuildError(
                    f"guest image {path} lacks {file.name}", "rebuild it with --force"
                )
        return image

    def metadata(self) -> dict[str, Any]:
        """Everything image.json records (sizes, timings, recipe, module list ...)."""
        return dict(json.loads((self.path / "image.json").read_text()))


def find_image(
    recipe: ImageRecipe, cache: Path | None = None, *, guest_src: Path | None = None
) -> GuestImage | None:
    """The cached image for ``recipe``, or None (never builds, never runs a command)."""
    path = (cache or cache_dir()) / "images" / recipe.digest(guest_src)
    if not (path / "image.json").is_file():
        return None
    try:
        return GuestImage.load(path)
    except ImageBuildError:
        return None


@contextlib.contextmanager
def _flock(path: Path, progress: Progress, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.info(f"waiting for another build of {what} to finish ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _reap(directory: Path, *patterns: str) -> None:
    """Remove what a crashed build of the same id left (we hold its lock: it is dead)."""
    for pattern in patterns:
        for stale in directory.glob(pattern):
            remove_tree(stale)


def build_image(
    recipe: ImageRecipe,
    cache: Path | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    guest_src: Path | None = None,
) -> GuestImage:
    """Return the image for ``recipe``, building it first if it is not cached.

    A cached image is returned at once, without running any command. Otherwise the
    build runs under ``images/<id>.lock`` (a concurrent build of the same recipe waits,
    then finds the image) in a temp dir that is renamed into place only when complete
    and removed on any failure or Ctrl-C. ``force`` rebuilds the image and its base
    tree (downloads are still reused); it replaces the image directory in place.
    """
    cache = Path(cache or cache_dir())
    progress = progress or Progress()
    image_id = recipe.digest(guest_src)
    images = cache / "images"
    if not force and (found := find_image(recipe, cache, guest_src=guest_src)):
        progress.info(f"guest image {image_id} is up to date: {found.path}")
        return found
    try:
        images.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageBuildError(
            f"cannot create {images}: {exc.strerror}", "run as root or set VMKG_CACHE_DIR"
        ) from exc
    with _flock(images / f"{image_id}.lock", progress, f"image {image_id}"):
        if not force and (found := find_image(recipe, cache, guest_src=guest_src)):
            return found
        _reap(images, f".tmp-{image_id}-*", f".old-{image_id}-*")
        tmp = images / f".tmp-{image_id}-{os.getpid()}"
        tmp.mkdir()
        runner = Runner(tmp / "build.log")
        try:
            _build(recipe, image_id, cache, tmp, runner, progress, force, guest_src or GUEST_SRC)
            return _publish(tmp, images / image_id)
        except BaseException as exc:
            failed_log = cache / "logs" / f"{image_id}.failed.log"
            translated = _translate(exc, failed_log)
            kept = _keep_log(runner, failed_log, translated)
            if isinstance(translated, ImageBuildError) and not kept:
                translated.log = None
            remove_tree(tmp)
            if translated is exc:
                raise
            raise translated from exc


def _translate(exc: BaseException, log: Path | None) -> BaseException:
    """The one place lower-level failures become ImageBuildError (Ctrl-C passes through)."""
    if isinstance(exc, ImageBuildError):
        result = exc
    elif disk_full(exc):
        result = ImageBuildError(
            "the disk holding the vmkg cache is full",
            "free some space (about 3 GiB are needed) or set VMKG_CACHE_DIR elsewhere",
            details=getattr(exc, "tail", ""),
        )
    elif isinstance(exc, CommandFailed):
        result = ImageBuildError(
            f"build command failed: {exc}", "see the build log", details=exc.tail
        )
    elif isinstance(exc, OSError):
        result = ImageBuildError(f"image build failed: {exc}", "see the build log")
    else:
        return exc
    if log is not None and result.log is None:
        result.log = str(log)
    return result


def _keep_log(runner: Runner, dest: Path, error: BaseException) -> bool:
    """Save the build log, ending with the error, before the temp dir goes."""
    try:
        runner.note(f"\nFAILED: {type(error).__name__}: {error}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(runner.log, dest)
        return True
    except OSError:
        return False


def _publish(tmp: Path, final: Path) -> GuestImage:
    if final.exists():  # --force: swap the old image out, then delete it
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        remove_tree(old)
    else:
        os.rename(tmp, final)
    return GuestImage.load(final)


def _build(
    recipe: ImageRecipe,
    image_id: str,
    cache: Path,
    tmp: Path,
    runner: Runner,
    progress: Progress,
    force: bool,
    guest_src: Path,
) -> None:
    """The seven steps, writing the finished image files into ``tmp``."""
    suite, reqs = recipe.debian_suite, recipe.requirements()
    wheels.guest_python(suite)  # unknown suite: fail before doing anything
    bases = cache / "bases"
    key = rootfs.base_key(suite, recipe.mirror, reqs)
    root = tmp / "root"
    with progress.step("check host"):
        check_host(cache)
    with contextlib.ExitStack() as base_lock:
        base_lock.enter_context(_flock(bases / f"{key}.lock", progress, f"base {key}"))
        _reap(bases, f".tmp-{key}-*")
        cached = not force and rootfs.has_base(bases, key)
        if cached:
            progress.skip("resolve python packages", f"cached in base {key}")
        else:
            with progress.step(f"resolve python packages ({len(reqs)} requested)"):
                wheels.download(runner, reqs, suite, cache / "downloads" / "wheels")
        kern = _kernel_steps(runner, progress, cache, tmp)
        if cached:
            with progress.step(f"unpack cached base {key}"):
                base = rootfs.load_base(runner, bases, key, root)
            progress.skip("install python packages", "cached")
        else:
            with progress.step(f"debootstrap {suite}"):
                rootfs.bootstrap(runner, suite, recipe.mirror, root, cache)
            with progress.step("install python packages, verify, save base"):
                base = rootfs.populate(runner, key, suite, recipe.mirror, reqs, root, cache)
                rootfs.save_base(runner, bases, base, root)
    if base is None:  # has_base() said yes a moment ago
        raise ImageBuildError(f"the cached base {key} vanished during the build", "build again")
    with progress.step("agent layer + mkfs.ext4"):
        disk.agent_layer(runner, root, guest_src, image_id)
        used = disk.make_ext4(runner, root, tmp / "rootfs.ext4", recipe.disk_size_mb)
        remove_tree(root)
        remove_tree(tmp / "pkgs")
    meta = {
        "format": FORMAT,
        "id": image_id,
        "kernel": "vmlinuz",
        "initrd": "initrd.img",
        "rootfs": "rootfs.ext4",
        "kernel_release": kern["release"],
        "python_version": base.python_version,
        "packages": list(base.packages),
        "cmdline": CMDLINE,
        "recipe": asdict(recipe),
        "base": key,
        "guest_sources": [p.name for p in disk.guest_sources(guest_src)],
        **{k: v for k, v in kern.items() if k != "release"},
        "sizes": {
            "rootfs_virtual": recipe.disk_size_mb * 2**20,
            "rootfs_used": used,
            "initrd": (tmp / "initrd.img").stat().st_size,
            "kernel": (tmp / "vmlinuz").stat().st_size,
        },
        "timings": dict(progress.timings),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "image.json").write_text(json.dumps(meta, indent=2) + "\n")


def _kernel_steps(runner: Runner, progress: Progress, cache: Path, tmp: Path) -> dict[str, Any]:
    """Steps 3 and 4: fetch kernel and busybox, write vmlinuz and initrd.img into ``tmp``."""
    debs = cache / "downloads" / "debs" / "host"
    with progress.step(f"fetch kernel ({kernel.KERNEL_META}) and busybox"):
        kpkg, kver = kernel.candidate(runner, kernel.KERNEL_META)
        bpkg, bver = kernel.candidate(runner, kernel.BUSYBOX)
        kern = kernel.unpack_kernel(
            runner,
            kernel.fetch_deb(runner, kpkg, kver, debs),
            f"{kpkg}={kver}",
            tmp / "pkgs" / "kernel",
        )
        busybox = kernel.unpack_busybox(
            runner, kernel.fetch_deb(runner, bpkg, bver, debs), tmp / "pkgs" / "busybox"
        )
        shutil.copyfile(kern.vmlinuz, tmp / "vmlinuz")
        if kern.config.is_file():
            shutil.copyfile(kern.config, tmp / "kernel.config")
    with progress.step(f"initramfs for {kern.release}"):
        modules = initramfs.build(
            runner, kern.modules, busybox, rootfs.FILES / "initramfs-init", tmp / "initrd.img"
        )
    return {
        "release": kern.release,
        "kernel_package": kern.package,
        "busybox_package": f"{bpkg}={bver}",
        "initramfs_modules": modules,
    }


def _recipe_from(args: argparse.Namespace) -> ImageRecipe:
    kwargs: dict[str, Any] = {
        "debian_suite": args.suite,
        "mirror": args.mirror,
        "disk_size_mb": args.disk_size_mb,
    }
    if args.packages is not None:
        kwargs["packages"] = tuple(p.strip() for p in args.packages.split(",") if p.strip())
    return ImageRecipe(**kwargs)


def _parser() -> argparse.ArgumentParser:
    default = ImageRecipe()
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument(
        "--packages",
        metavar="A,B",
        help="comma-separated pip requirements for the guest, replacing the "
        f"default ({','.join(default.packages)}); ipykernel, pyzmq and orjson are "
        "always added; binary wheels only",
    )
    recipe.add_argument(
        "--suite",
        default=default.debian_suite,
        help=f"Debian suite of the guest (default {default.debian_suite}; "
        f"known: {', '.join(wheels.SUITES)})",
    )
    recipe.add_argument("--mirror", default=default.mirror, help="Debian mirror for debootstrap")
    recipe.add_argument(
        "--disk-size-mb",
        type=int,
        default=default.disk_size_mb,
        help="virtual size of the sparse ext4 root image (default %(default)s)",
    )
    recipe.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default $VMKG_CACHE_DIR, else /var/cache/vmkg "
        "as root, else ~/.cache/vmkg)",
    )
    parser = argparse.ArgumentParser(
        prog="python -m kernelmanager.image",
        description="Build the guest image vmkg boots its kernels from: a Debian cloud kernel, "
        "a busybox initramfs and an ext4 root file system with python3, ipykernel and the "
        "requested packages plus the vmkg agent (guest/*.py). Images are cached by a digest "
        "of the recipe and of the agent's sources; a second build is a no-op.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,path}")
    build = sub.add_parser(
        "build",
        parents=[recipe],
        help="build the image unless cached; print its directory",
        description="Build the guest image (needs "
        "root, ~3 GiB free, a Debian mirror and PyPI) unless it is cached, "
        "then print its directory.",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if cached (also rebuilds the debootstrap+pip base)",
    )
    build.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    sub.add_parser(
        "path",
        parents=[recipe],
        help="print the image directory if it is built",
        description="Print the directory of the image for this recipe; exit 1 "
        "if it has not been built.",
    )
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """``python -m kernelmanager.image {build,path}``; exit status 0, 1 (error) or 130 (Ctrl-C)."""
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up on `kill` as on Ctrl-C
    try:
        recipe = _recipe_from(args)
        if args.command == "path":
            found = find_image(recipe, args.cache_dir)
            if found is None:
                print(
                    f"error: guest image {recipe.digest()} is not built; run "
                    "python -m kernelmanager.image build (same options)",
                    file=sys.stderr,
                )
                return 1
            print(found.path)
            return 0
        start = time.monotonic()
        progress = Progress(enabled=not args.quiet)
        image = build_image(recipe, args.cache_dir, force=args.force, progress=progress)
        if not args.quiet:
            print(
                f"guest image {image.id} ready in {time.monotonic() - start:.1f} s", file=sys.stderr
            )
        print(image.path)
        return 0
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.details:
            print("  " + exc.details.replace("\n", "\n  "), file=sys.stderr)
        if exc.log:
            print(f"full log: {exc.log}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the partial build was removed", file=sys.stderr)
        return 130
