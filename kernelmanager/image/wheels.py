"""Python packages for the guest, resolved and installed from the host with pip.

The guest's interpreter is Debian's python3 (bookworm: CPython 3.11, glibc 2.36), so pip
runs on the host with ``--python-version/--abi/--platform`` set to the guest's tags and
``--only-binary=:all:`` (no compiler in the guest, no source builds). pip 23 does not
widen ``manylinux_2_36`` to older manylinux tags by itself, so every older tag is listed.

pip on the host keeps the host's own configuration (CA bundle, find-links, extra index,
constraints): that is how this machine reaches PyPI at all. The wheels land in the
cache's ``downloads/wheels`` and are installed from there with ``--no-index``.
"""

from __future__ import annotations

import re
import sys
from email.parser import HeaderParser
from pathlib import Path

from .errors import ImageBuildError
from .runner import CommandFailed, Runner

# Debian suite -> (python3 version, glibc minor version) of that release
SUITES = {"bullseye": ("3.9", 31), "bookworm": ("3.11", 36), "trixie": ("3.13", 41)}
#: in every guest: the kernel, its transport, and orjson, which jupyter_client's Session
#: packs messages with when it is there (the kernel's JSON encoding of a 20 MB output took
#: 1.3-1.6 s of emulated CPU with the json module, 0.2-0.3 s with orjson)
ALWAYS = ("ipykernel", "pyzmq", "orjson")
_NETWORK_ERRORS = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeout",
    "ReadTimeout",
    "Connection refused",
    "SSLError",
    "ProxyError",
)


def guest_python(suite: str) -> tuple[str, int]:
    """(python version, glibc minor) of a Debian suite's python3."""
    try:
        return SUITES[suite]
    except KeyError:
        raise ImageBuildError(
            f"unsupported Debian suite {suite!r}", f"use one of {', '.join(SUITES)}"
        ) from None


def canonical(name: str) -> str:
    """PEP 503 name of a requirement string (``Foo_Bar[x]>=1`` -> ``foo-bar``)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", name)
    if not m:
        raise ImageBuildError(
            f"not a pip requirement: {name!r}", "use names like 'numpy' or 'numpy>=2'"
        )
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def requirements(packages: tuple[str, ...]) -> list[str]:
    """ALWAYS (ipykernel, pyzmq, orjson) first, then the recipe's packages, without repeats."""
    reqs: list[str] = []
    seen: set[str] = set()
    for req in (*ALWAYS, *packages):
        req = req.strip()
        if req and req not in seen:
            canonical(req)
            seen.add(req)
            reqs.append(req)
    return reqs


def target_args(suite: str) -> list[str]:
    """pip options that select wheels for the guest's interpreter and glibc."""
    pyver, glibc = guest_python(suite)
    abi = "cp" + pyver.replace(".", "")
    args = ["--python-version", pyver, "--implementation", "cp", "--abi", abi]
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(glibc, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    for platform in platforms:
        args += ["--platform", platform]
    return [*args, "--only-binary=:all:"]


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _translate(exc: CommandFailed, suite: str, what: str) -> ImageBuildError:
    pyver, _ = guest_python(suite)
    text = exc.tail
    if any(marker in text for marker in _NETWORK_ERRORS):
        return ImageBuildError(
            f"pip {what} failed: could not reach PyPI",
            "check the network and the host's pip configuration (pip config list)",
            details=text,
        )
    missing = re.search(r"No matching distribution found for (\S+)", text) or re.search(
        r"satisfies the requirement (\S+)", text
    )
    if missing:
        return ImageBuildError(
            f"pip found no wheel of {missing.group(1)} for the guest "
            f"(CPython {pyver}, manylinux x86_64)",
            "check the package name on PyPI; the guest takes binary wheels only",
            details=text,
        )
    if "ResolutionImpossible" in text or "conflict" in text.lower():
        return ImageBuildError(
            f"pip {what} failed: the requested packages conflict",
            "relax the version pins in --packages",
            details=text,
        )
    return ImageBuildError(f"pip {what} failed", "see the build log", details=text)


def download(runner: Runner, reqs: list[str], suite: str, dest: Path) -> None:
    """Resolve ``reqs`` for the guest and fetch the wheels into ``dest`` (cheap; run first)."""
    dest.mkdir(parents=True, exist_ok=True)
    options = ["--progress-bar", "off", "--dest", str(dest), *target_args(suite)]
    try:
        runner.run([*_pip(), "download", *options, *reqs])
    except CommandFailed as exc:
        raise _translate(exc, suite, "download") from exc


def install(runner: Runner, reqs: list[str], suite: str, wheels: Path, target: Path) -> None:
    """Install ``reqs`` from the downloaded wheels into the guest's ``target`` directory."""
    options = ["--no-index", "--find-links", str(wheels), "--target", str(target), "--no-compile"]
    options += ["--no-warn-script-location", "--progress-bar", "off", *target_args(suite)]
    try:
        runner.run([*_pip(), "install", *options, *reqs])
    except CommandFailed as exc:
        raise _translate(exc, suite, "install") from exc


def _dists(target: Path) -> dict[str, tuple[str, str, Path]]:
    """canonical name -> (name, version, dist-info dir) of what is installed in ``target``."""
    found = {}
    for info in target.glob("*.dist-info"):
        meta = HeaderParser().parsestr((info / "METADATA").read_text(errors="replace"))
        name, version = meta.get("Name", ""), meta.get("Version", "")
        if name:
            found[canonical(name)] = (name, version, info)
    return found


def installed(target: Path) -> tuple[str, ...]:
    """``name==version`` of every distribution in ``target``, sorted by name."""
    dists = sorted(_dists(target).values(), key=lambda d: d[0].lower())
    return tuple(f"{name}=={version}" for name, version, _ in dists)


def _top_level(info: Path) -> list[str]:
    top = info / "top_level.txt"
    if top.is_file():
        return [n.strip() for n in top.read_text().splitlines() if n.strip()]
    names = []
    for line in (info / "RECORD").read_text().splitlines():
        first = line.split(",")[0].split("/")[0]
        if first.endswith(".py"):
            names.append(first[:-3])
        elif "/" in line.split(",")[0] and not first.endswith((".dist-info", ".data", ".libs")):
            names.append(first)
    return sorted(set(names) - {"bin", "share", "__pycache__"})


def import_names(target: Path, reqs: list[str]) -> list[str]:
    """The module to import to check each requirement, where the name maps simply.

    That is the requirement's own name (``foo-bar`` -> ``foo_bar``) when the
    distribution provides it, else its single public top-level package; anything
    more tangled is left unchecked rather than guessed.
    """
    dists = _dists(target)
    modules = []
    for req in reqs:
        dist = dists.get(canonical(req))
        if dist is None:
            raise ImageBuildError(f"{req} is not installed in the guest after pip install")
        top = [n for n in _top_level(dist[2]) if not n.startswith("_")]
        plain = canonical(req).replace("-", "_")
        if plain in top:
            modules.append(plain)
        elif len(top) == 1:
            modules.append(top[0])
    return modules
