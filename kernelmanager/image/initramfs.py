"""The initramfs: static busybox, a few kernel modules, and ``files/initramfs-init``.

Its only job is to load the drivers the Debian cloud kernel has as modules (virtio-mmio,
virtio-blk, virtio-console, vsock ...), mount ``/dev/vda`` and ``switch_root`` into it;
no udev, so it boots in well under a second even under TCG.

The kernel .deb carries no ``modules.dep`` (Debian runs depmod at install time), so the
dependencies are read from each module's ``.modinfo`` ELF section. Modules are packed
uncompressed because busybox ``insmod`` may not understand ``.ko.xz``/``.ko.zst``.
The archive is written here (cpio "newc", gzip) rather than with cpio(1), which lets it
hold ``/dev/console`` without mknod and makes it byte-for-byte reproducible.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageBuildError
from .runner import Runner

REQUIRED_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "ext4")
OPTIONAL_MODULES = ("vsock", "vmw_vsock_virtio_transport", "virtio_net")
_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: Path | str) -> str:
    name = Path(path).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed if it is stored compressed."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not an ELF64 file")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        (name,) = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        if elf[stroff + name : elf.index(b"\0", stroff + name)] == b".modinfo":
            for item in elf[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


@dataclass
class ModuleSet:
    """Modules of one kernel: where each lives and which are built in."""

    root: Path  # lib/modules/<release>

    def __post_init__(self) -> None:
        self.paths = {
            module_name(p): p
            for p in sorted((self.root / "kernel").rglob("*.ko*"))
            if p.name.endswith(_SUFFIXES)
        }
        builtin = self.root / "modules.builtin"
        self.builtin = {module_name(line) for line in builtin.read_text().split() if line}
        self._deps: dict[str, list[str]] = {}

    def deps(self, name: str) -> list[str]:
        """Hard dependencies plus ``softdep pre:`` ones that exist as modules."""
        if name not in self._deps:
            info = modinfo(read_module(self.paths[name]))
            hard = [d for v in info.get("depends", []) for d in v.split(",") if d]
            soft: list[str] = []
            for v in info.get("softdep", []):
                words = v.split()
                if "pre:" in words:
                    for w in words[words.index("pre:") + 1 :]:
                        if w.endswith(":"):
                            break
                        soft.append(w.replace("-", "_"))
            self._deps[name] = hard + [s for s in soft if s in self.paths]
        return self._deps[name]

    def load_order(self, required: Iterable[str], optional: Iterable[str] = ()) -> list[str]:
        """Module names to insmod, dependencies first; built-in ones are left out."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str, chain: tuple[str, ...]) -> None:
            if name in seen or name in self.builtin:
                return
            if name in chain:
                raise ImageBuildError(f"kernel module dependency cycle: {' -> '.join(chain)}")
            for dep in self.deps(name):
                if dep not in self.paths and dep not in self.builtin:
                    raise ImageBuildError(f"module {name} needs {dep}, which the kernel lacks")
                visit(dep, chain + (name,))
            seen.add(name)
            order.append(name)

        for name in required:
            if name not in self.paths and name not in self.builtin:
                raise ImageBuildError(
                    f"the guest kernel has no {name} driver (neither built in nor a module)",
                    "use a kernel package with virtio-mmio/virtio-blk/ext4 support",
                )
            visit(name, ())
        for name in optional:
            if name in self.paths:
                visit(name, ())
        return order


class Newc:
    """A minimal writer of cpio "newc" archives (the format the kernel unpacks)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self._pad()
        self.buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def busybox_applets(runner: Runner, busybox: Path) -> list[str]:
    out = runner.run([busybox, "--list"], capture=True)
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def build(
    runner: Runner, modules_dir: Path, busybox: Path, init_script: Path, out: Path
) -> list[str]:
    """Write the gzip'd initramfs to ``out``; return the module names it loads, in order."""
    mods = ModuleSet(modules_dir)
    order = mods.load_order(REQUIRED_MODULES, OPTIONAL_MODULES)
    cpio = Newc()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules", "etc", "tmp"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in busybox_applets(runner, busybox):
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin", "bin")
    for name in order:
        cpio.file(f"lib/modules/{name}.ko", read_module(mods.paths[name]))
    cpio.file("lib/modules/load-order", "".join(f"{n}\n" for n in order).encode())
    cpio.file("init", init_script.read_bytes(), 0o755)
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=9, mtime=0))
    return order
