"""The guest's root tree up to (not including) the agent: the expensive, cached layer.

debootstrap (minbase + python3) -> pip-installed packages -> user ``jovyan``, hostname
-> slimmed (docs, man pages, locales, apt caches, package test suites) -> bytecode
compiled -> every requested package imported once in the guest's python3. The result
is stored as ``<cache>/bases/<key>.tar.zst`` with ``<key>.json`` beside it (written
last: no json, no base), keyed by suite, mirror, requirements and this layer's own
source, so a change to the agent alone never re-runs debootstrap or pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import wheels
from .errors import ImageBuildError
from .runner import GUEST_ENV, CommandFailed, Runner

FILES = Path(__file__).resolve().parent / "files"
JOVYAN = 1000
_TAR = ("tar", "--numeric-owner", "--xattrs", "--xattrs-include=*")
_SLIM_GLOBS = (
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "usr/share/lintian/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*_*",
    "var/cache/debconf/*-old",
    "var/log/*.log",
    "var/log/apt/*",
)


@dataclass(frozen=True)
class Base:
    """What a finished base tree holds (stored as ``<key>.json``)."""

    key: str
    suite: str
    mirror: str
    requirements: tuple[str, ...]
    python_version: str
    packages: tuple[str, ...]  # resolved name==version
    created: str


def site_packages(suite: str) -> str:
    """Where pip's packages go in the guest (on Debian's python3 sys.path by default)."""
    pyver, _ = wheels.guest_python(suite)
    return f"usr/local/lib/python{pyver}/dist-packages"


def base_key(suite: str, mirror: str, reqs: list[str]) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps([suite, mirror.rstrip("/"), sorted(reqs), wheels.target_args(suite)]).encode()
    )
    for src in (Path(__file__), Path(wheels.__file__), FILES / "verify-imports.py"):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def load_base(runner: Runner, bases: Path, key: str, root: Path) -> Base | None:
    """Unpack the cached base ``key`` into ``root``; None when there is none."""
    meta, tarball = bases / f"{key}.json", bases / f"{key}.tar.zst"
    if not (meta.is_file() and tarball.is_file()):
        return None
    root.mkdir(parents=True, exist_ok=True)
    try:
        data = json.loads(meta.read_text())
        runner.run([*_TAR, "-I", "zstd -q", "-xpf", tarball, "-C", root])
        data.update(requirements=tuple(data["requirements"]), packages=tuple(data["packages"]))
        return Base(**data)
    except (CommandFailed, ValueError, KeyError, TypeError) as exc:
        raise ImageBuildError(
            f"the cached base {tarball} is unusable",
            f"delete {bases / key}.* or build with --force",
            details=getattr(exc, "tail", str(exc)),
        ) from exc


def save_base(runner: Runner, bases: Path, base: Base, root: Path) -> None:
    """Store ``root`` as base ``base.key``: tarball first, then the json that marks it done."""
    bases.mkdir(parents=True, exist_ok=True)
    tmp = bases / f".tmp-{base.key}-{os.getpid()}.tar.zst"
    try:
        runner.run([*_TAR, "-I", "zstd -q -T0 -3", "-cf", tmp, "-C", root, "."])
        os.replace(tmp, bases / f"{base.key}.tar.zst")
    finally:
        tmp.unlink(missing_ok=True)
    meta_tmp = bases / f".tmp-{base.key}-{os.getpid()}.json"
    meta_tmp.write_text(json.dumps(asdict(base), indent=2) + "\n")
    os.replace(meta_tmp, bases / f"{base.key}.json")


def has_base(bases: Path, key: str) -> bool:
    return (bases / f"{key}.json").is_file() and (bases / f"{key}.tar.zst").is_file()


def debootstrap(runner: Runner, suite: str, mirror: str, root: Path, debs: Path) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    try:
        options = ("--variant=minbase", "--include=python3", f"--cache-dir={debs}")
        runner.run(["debootstrap", *options, suite, root, mirror])
    except CommandFailed as exc:
        raise ImageBuildError(
            f"debootstrap {suite} failed: could not reach the mirror {mirror} "
            "or a package failed to install",
            "check the network, the mirror URL and the suite name (see the log)",
            details=exc.tail,
        ) from exc


def chroot(runner: Runner, root: Path, *argv: str, capture: bool = False, **env: str) -> str:
    return runner.run(["chroot", root, *argv], env={**GUEST_ENV, **env}, capture=capture)


def install_packages(
    runner: Runner, reqs: list[str], suite: str, wheel_dir: Path, root: Path
) -> None:
    """pip install into the guest's dist-packages; scripts to /usr/local/bin, data to share."""
    target = root / site_packages(suite)
    wheels.install(runner, reqs, suite, wheel_dir, target)
    bindir = target / "bin"
    if bindir.is_dir():
        dest = root / "usr/local/bin"
        dest.mkdir(parents=True, exist_ok=True)
        for script in sorted(bindir.iterdir()):
            data = script.read_bytes()
            if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                data = b"#!/usr/bin/python3\n" + data.split(b"\n", 1)[1]
            (dest / script.name).write_bytes(data)
            (dest / script.name).chmod(0o755)
        shutil.rmtree(bindir)
    share = target / "share"
    if share.is_dir():
        shutil.copytree(share, root / "usr/local/share", dirs_exist_ok=True)
        shutil.rmtree(share)


def configure(root: Path) -> None:
    """Hostname, hosts, and the unprivileged user jovyan (uid/gid 1000, /home/jovyan)."""
    (root / "etc/hostname").write_text("vmkg\n")
    (root / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\tvmkg\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # debootstrap copied the host's resolver config in; the guest has no use for it
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")
    for name in ("hostname", "hosts", "resolv.conf"):  # debootstrap copies the host's modes
        (root / "etc" / name).chmod(0o644)
    entries = {
        "etc/passwd": f"jovyan:x:{JOVYAN}:{JOVYAN}:Jupyter user:/home/jovyan:/bin/bash\n",
        "etc/group": f"jovyan:x:{JOVYAN}:\n",
        "etc/shadow": "jovyan:!:19000:0:99999:7:::\n",
        "etc/gshadow": "jovyan:!::\n",
    }
    for rel, line in entries.items():
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if not any(existing.startswith("jovyan:") for existing in text.splitlines()):
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line)
    home = root / "home/jovyan"
    home.mkdir(parents=True, exist_ok=True)
    for skel in (root / "etc/skel").glob(".*"):
        if skel.is_file():
            shutil.copy2(skel, home / skel.name)
            os.chown(home / skel.name, JOVYAN, JOVYAN)
    home.chmod(0o755)
    os.chown(home, JOVYAN, JOVYAN)


def slim(root: Path, suite: str) -> None:
    """Drop what a kernel never reads: docs, man pages, locales, apt caches, test suites."""
    for pattern in _SLIM_GLOBS:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for tests in sorted((root / site_packages(suite)).glob("*/**/tests"), reverse=True):
        if tests.is_dir() and (tests.parent / "__init__.py").exists():
            shutil.rmtree(tests)
    shutil.rmtree(root / "root/.cache/pip", ignore_errors=True)


def compile_tree(runner: Runner, root: Path, path: str, mode: str) -> None:
    """Precompile bytecode with the guest's own python3 so the first import is fast."""
    compileall = ("/usr/bin/python3", "-m", "compileall", "-q", "--invalidation-mode", mode)
    try:
        chroot(runner, root, *compileall, "/" + path)
    except CommandFailed as exc:
        raise ImageBuildError(
            f"byte-compiling /{path} in the guest failed", "see the build log", details=exc.tail
        ) from exc


def verify(runner: Runner, root: Path, modules: list[str]) -> str:
    """Import ``modules`` with the guest's python3 in the tree; return its version."""
    script = root / "tmp/vmkg-verify-imports.py"
    shutil.copy(FILES / "verify-imports.py", script)
    try:
        out = chroot(
            runner, root, "/usr/bin/python3", "/tmp/vmkg-verify-imports.py", *modules, capture=True
        )
    except CommandFailed as exc:
        raise ImageBuildError(
            "installed packages do not import in the guest's python3",
            "a wheel may need a newer glibc or a system library the guest lacks; see the log",
            details=exc.tail,
        ) from exc
    finally:
        script.unlink(missing_ok=True)
    return str(json.loads(out.strip().splitlines()[-1])["python"])


def guest_python_version(runner: Runner, root: Path, suite: str) -> str:
    """The tree's python3 version; it must be the one the wheels were chosen for."""
    code = "import platform; print(platform.python_version())"
    out = chroot(runner, root, "/usr/bin/python3", "-c", code, capture=True)
    version = out.strip()
    expected, _ = wheels.guest_python(suite)
    if not version.startswith(expected + "."):
        raise ImageBuildError(
            f"the {suite} guest has python {version}, the builder expected {expected}",
            "update wheels.SUITES for this suite",
        )
    return version


def bootstrap(runner: Runner, suite: str, mirror: str, root: Path, cache: Path) -> None:
    """debootstrap the minimal system with python3 into ``root`` (the temp build tree)."""
    debootstrap(runner, suite, mirror, root, cache / "downloads" / "debs" / suite)
    guest_python_version(runner, root, suite)


def populate(
    runner: Runner, key: str, suite: str, mirror: str, reqs: list[str], root: Path, cache: Path
) -> Base:
    """Packages, user, tidy-up and bytecode on a bootstrapped tree, then verify imports."""
    install_packages(runner, reqs, suite, cache / "downloads" / "wheels", root)
    configure(root)
    slim(root, suite)
    compile_tree(runner, root, site_packages(suite), "unchecked-hash")
    modules = wheels.import_names(root / site_packages(suite), reqs)
    python_version = verify(runner, root, modules)
    return Base(
        key=key,
        suite=suite,
        mirror=mirror,
        requirements=tuple(reqs),
        python_version=python_version,
        packages=wheels.installed(root / site_packages(suite)),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
