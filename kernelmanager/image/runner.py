"""Running the build's commands: a log file, host checks, and safe cleanup.

Every command's output goes to one build log; when a command fails the caller gets a
:class:`CommandFailed` carrying the last lines of that output and turns it into an
:class:`~kernelmanager.image.errors.ImageBuildError` that says what the step was doing.
"""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import ImageBuildError

SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
GUEST_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
}
"""Environment for commands run inside the guest tree with chroot: nothing of the host's
Python setup (pyenv, PYTHONPATH, PIP_*) may leak into the guest interpreter."""

# tool -> Debian package that provides it
TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "apt-cache": "apt",
    "tar": "tar",
    "zstd": "zstd",
    "chroot": "coreutils",
    "umount": "mount",
}
NEEDED_FREE_BYTES = 3 * 1024**3


class CommandFailed(Exception):
    """A build command exited non-zero (internal; translated by the calling step)."""

    def __init__(self, argv: Sequence[str], returncode: int, tail: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = tail
        super().__init__(f"{shlex.join(self.argv)} exited with {returncode}")


def host_env(**overrides: str) -> dict[str, str]:
    """The host environment for host-side tools, with the sbin directories on PATH."""
    env = dict(os.environ)
    env["PATH"] = SBIN_PATH + ":" + env.get("PATH", "")
    env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", DEBIAN_FRONTEND="noninteractive")
    env.update(overrides)
    return env


def which(tool: str) -> str | None:
    return shutil.which(tool, path=SBIN_PATH + ":" + os.environ.get("PATH", ""))


class Runner:
    """Runs commands for one build, appending their output to ``log``."""

    def __init__(self, log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        with self.log.open("a") as f:
            f.write(text.rstrip("\n") + "\n")

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        capture: bool = False,
    ) -> str:
        """Run ``argv``; return its stdout when ``capture`` (stderr always goes to the log).

        Raises CommandFailed with the last lines of output when it exits non-zero.
        """
        args = [os.fspath(a) for a in argv]
        self.note(f"\n$ {shlex.join(args)}" + (f"   (in {cwd})" if cwd else ""))
        start = self.log.stat().st_size
        with self.log.open("ab") as logf:
            try:
                proc = subprocess.run(
                    args,
                    cwd=cwd,
                    env=dict(env) if env is not None else host_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if capture else logf,
                    stderr=logf,
                    check=False,
                )
            except FileNotFoundError as exc:
                raise missing_tool(args[0]) from exc
        out = proc.stdout.decode(errors="replace") if capture else ""
        if capture and out:
            self.note(out)
        if proc.returncode != 0:
            raise CommandFailed(args, proc.returncode, self.tail(start))
        return out

    def tail(self, since: int = 0, lines: int = 15) -> str:
        with self.log.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])


def missing_tool(tool: str) -> ImageBuildError:
    package = TOOLS.get(Path(tool).name, Path(tool).name)
    return ImageBuildError(
        f"required tool {Path(tool).name!r} is not installed",
        f"apt-get install {package}",
    )


def check_host(cache: Path) -> None:
    """Fail early, with a hint, when this host cannot build an image at all."""
    if os.geteuid() != 0:
        raise ImageBuildError(
            "image build needs root for debootstrap/chroot", "run as root (e.g. sudo)"
        )
    missing = sorted({pkg for tool, pkg in TOOLS.items() if which(tool) is None})
    if missing:
        raise ImageBuildError("required tools are missing", f"apt-get install {' '.join(missing)}")
    try:
        import pip  # noqa: F401
    except ImportError as exc:
        raise ImageBuildError(
            "pip is not available for the Python running the builder",
            "apt-get install python3-pip (or python -m ensurepip)",
        ) from exc
    st = os.statvfs(cache)
    free = st.f_bavail * st.f_frsize
    if free < NEEDED_FREE_BYTES:
        raise ImageBuildError(
            f"not enough free disk space in {cache}: {free / 1024**3:.1f} GiB free, "
            f"about {NEEDED_FREE_BYTES / 1024**3:.0f} GiB needed",
            "free some space or point VMKG_CACHE_DIR / --cache-dir elsewhere",
        )


def disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, CommandFailed) and "No space left on device" in exc.tail


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == root or mnt.startswith(root + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Delete a build tree, first unmounting anything mounted inside it.

    A debootstrap interrupted half-way can leave /proc or /sys mounted inside the
    target; deleting through such a mount would wander into the host's files, so this
    refuses to delete while any mount remains.
    """
    if not os.path.lexists(path):
        return
    for mnt in mounts_under(path):
        subprocess.run(
            ["umount", "-l", mnt],
            check=False,
            env=host_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    left = mounts_under(path)
    if left:
        raise ImageBuildError(
            f"cannot remove {path}: still mounted: {', '.join(left)}",
            "unmount them by hand, then delete the directory",
        )
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
