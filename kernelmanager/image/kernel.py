"""The guest kernel and busybox, taken from Debian packages on the host's apt sources.

``linux-image-cloud-amd64`` is a metapackage; its dependency names the real
``linux-image-<abi>-cloud-amd64`` package, which ships ``boot/vmlinuz-<release>`` and
``lib/modules/<release>/``. Downloaded ``.deb`` files are kept in the cache's
``downloads/debs`` directory, so a rebuild needs the network only when apt's candidate
version changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageBuildError
from .runner import CommandFailed, Runner

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"


@dataclass(frozen=True)
class Kernel:
    """A kernel unpacked from its .deb: the vmlinuz, its release and module tree."""

    package: str  # e.g. linux-image-6.1.0-56-cloud-amd64=6.1.192-2
    release: str  # e.g. 6.1.0-56-cloud-amd64
    vmlinuz: Path
    config: Path
    modules: Path  # .../lib/modules/<release>


def _apt_show(runner: Runner, package: str) -> str:
    """``apt-cache show`` for the candidate version; runs ``apt-get update`` once if unknown."""
    for attempt in (1, 2):
        try:
            out = runner.run(["apt-cache", "show", "--no-all-versions", package], capture=True)
            if out.strip():
                return out
        except CommandFailed:
            pass
        if attempt == 1:
            try:
                runner.run(["apt-get", "update"])
            except CommandFailed as exc:
                raise ImageBuildError(
                    "apt-get update failed: could not reach the Debian mirror",
                    "check the network and /etc/apt/sources.list",
                    details=exc.tail,
                ) from exc
    raise ImageBuildError(
        f"apt does not know the package {package!r}",
        "add a Debian main archive to /etc/apt/sources.list and run apt-get update",
    )


def _field(control: str, name: str) -> str:
    m = re.search(rf"^{name}: *(.+)$", control, re.MULTILINE)
    return m.group(1).strip() if m else ""


def candidate(runner: Runner, package: str) -> tuple[str, str]:
    """(package, version) apt would install; a kernel metapackage resolves to its image."""
    control = _apt_show(runner, package)
    version = _field(control, "Version")
    if package == KERNEL_META:
        m = re.search(r"(linux-image-[0-9][^\s,(]*-cloud-amd64)", _field(control, "Depends"))
        if not m:
            raise ImageBuildError(
                f"cannot tell which kernel {KERNEL_META} {version} depends on",
                "check `apt-cache show linux-image-cloud-amd64`",
            )
        return candidate(runner, m.group(1))
    return package, version


def fetch_deb(runner: Runner, package: str, version: str, debs: Path) -> Path:
    """The .deb of ``package=version`` in ``debs``, downloaded with apt-get if not there yet."""
    debs.mkdir(parents=True, exist_ok=True)
    name = f"{package}_{version.replace(':', '%3a')}_"
    found = sorted(debs.glob(f"{name}*.deb"))
    if found:
        return found[-1]
    try:
        runner.run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
            cwd=debs,
        )
    except CommandFailed as exc:
        raise ImageBuildError(
            f"apt-get download {package} failed: could not reach the Debian mirror",
            "check the network and the host's apt sources (apt-get update)",
            details=exc.tail,
        ) from exc
    found = sorted(debs.glob(f"{name}*.deb"))
    if not found:
        raise ImageBuildError(f"apt-get download left no .deb for {package}", "see the build log")
    return found[-1]


def extract(runner: Runner, deb: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    try:
        runner.run(["dpkg-deb", "-x", deb, dest])
    except CommandFailed as exc:
        raise ImageBuildError(
            f"cannot unpack {deb.name} (corrupt download?)",
            f"delete {deb} and build again",
            details=exc.tail,
        ) from exc
    return dest


def unpack_kernel(runner: Runner, deb: Path, package: str, dest: Path) -> Kernel:
    root = extract(runner, deb, dest)
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if len(images) != 1:
        raise ImageBuildError(f"{deb.name} holds {len(images)} vmlinuz files, expected 1")
    release = images[0].name.removeprefix("vmlinuz-")
    modules = root / "lib" / "modules" / release
    if not (modules / "modules.builtin").is_file():
        raise ImageBuildError(f"{deb.name} has no lib/modules/{release}/modules.builtin")
    return Kernel(package, release, images[0], root / "boot" / f"config-{release}", modules)


def unpack_busybox(runner: Runner, deb: Path, dest: Path) -> Path:
    busybox = extract(runner, deb, dest) / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageBuildError(f"{deb.name} has no bin/busybox")
    return busybox
