"""The cheap last layer: the agent's sources and init script, then the ext4 disk image.

Redone for every image (it takes seconds), so any change to ``guest/*.py`` or
``guest/*.c`` gives a new image on top of the same cached base tree. The C sources are
compiled here, on the host, against the stable ABI (``Py_LIMITED_API``, CPython >= 3.11),
so one build loads in the guest's Python whatever Python runs the builder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from .errors import ImageBuildError
from .rootfs import FILES, compile_tree
from .runner import CommandFailed, Runner

AGENT_DIR = "opt/vmkg"
INIT = "sbin/vmkg-init"
SELFTEST = "usr/local/bin/vmkg-selftest"
LABEL = "vmkgroot"


def guest_sources(guest_src: Path) -> list[Path]:
    """The agent's modules and its C sources: every ``*.py`` and ``*.c`` directly in ``guest/``."""
    return sorted(p for p in (*guest_src.glob("*.py"), *guest_src.glob("*.c")) if p.is_file())


def extension_name(source: Path) -> str:
    """guest/<name>.c -> the extension module file beside the agent's modules (its module
    is ``_vmkg_<name>``; guest/outstream.py's ``EXTENSION`` names fastout's)."""
    return f"_vmkg_{source.stem}.abi3.so"


def build_extension(source: Path, dest: Path, cc: str = "gcc") -> Path:
    """Compile one of the guest's C sources into the extension module file ``dest``
    (stable ABI: the source defines ``Py_LIMITED_API``), with this Python's headers."""
    include = sysconfig.get_paths()["include"]
    if not Path(include, "Python.h").is_file():
        raise ImageBuildError(f"no Python headers in {include} to compile {source.name}",
                              "apt-get install python3-dev")
    if shutil.which(cc) is None:
        raise ImageBuildError(f"no C compiler ({cc}) to compile {source.name}", "apt-get install gcc")
    tmp = dest.with_name(f".{dest.name}.tmp")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Wno-unused-parameter",
           "-Wno-cast-function-type", f"-I{include}", str(source), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(f"compiling {source.name} failed: {done.stderr.strip()[-2000:]}",
                              "fix the source (the command was: " + " ".join(cmd) + ")")
    tmp.replace(dest)
    return dest


def agent_layer(runner: Runner, root: Path, guest_src: Path, image_id: str) -> None:
    """Copy the agent in as /opt/vmkg/guest, add /sbin/vmkg-init and the self-test."""
    pkg = root / AGENT_DIR / "guest"
    shutil.rmtree(root / AGENT_DIR, ignore_errors=True)
    pkg.mkdir(parents=True)
    (root / AGENT_DIR).chmod(0o755)
    pkg.chmod(0o755)
    for src in guest_sources(guest_src):
        if src.suffix == ".c":
            build_extension(src, pkg / extension_name(src)).chmod(0o644)
            continue
        shutil.copyfile(src, pkg / src.name)
        (pkg / src.name).chmod(0o644)
    for name, rel in (("vmkg-init", INIT), ("vmkg-selftest", SELFTEST)):
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(FILES / name, dest)
        dest.chmod(0o755)
    (root / "etc/vmkg-image").write_text(image_id + "\n")
    compile_tree(runner, root, AGENT_DIR, "checked-hash")


def tree_bytes(root: Path) -> int:
    """Space the tree takes (allocated blocks, each hard-linked inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def make_ext4(runner: Runner, root: Path, out: Path, size_mb: int) -> int:
    """Write ``root`` into a sparse ext4 image of ``size_mb``; return the bytes it uses."""
    need = tree_bytes(root)
    # ext4 metadata (inode tables, journal) takes ~5-8% of a small file system
    if need > size_mb * 1024 * 1024 * 0.9:
        raise ImageBuildError(
            f"the root tree ({need / 2**20:.0f} MiB) does not fit in a {size_mb} MiB disk",
            f"raise disk_size_mb (--disk-size-mb {int(need / 2**20 / 0.8) + 1})",
        )
    with out.open("wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    try:
        runner.run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-E", "root_owner=0:0", "-d", root, out])
    except CommandFailed as exc:
        if "Could not allocate" in exc.tail or "No free space" in exc.tail:
            raise ImageBuildError(
                f"the root tree ({need / 2**20:.0f} MiB) does not fit in a {size_mb} MiB disk",
                "raise disk_size_mb (--disk-size-mb)",
                details=exc.tail,
            ) from exc
        raise
    return out.stat().st_blocks * 512
