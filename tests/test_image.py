"""Tests of the guest image builder (kernelmanager/image/).

The ``vm`` tests build the default image for real into the shared cache
(``cache_dir()``, the image everybody else boots; a no-op once built) and boot it under
QEMU. The others need no image: digests, the build lock, cleanup after a failure or a
Ctrl-C, the initramfs archive writer.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kernelmanager.image import (
    GuestImage,
    ImageBuildError,
    ImageRecipe,
    Progress,
    build_image,
    cache_dir,
    find_image,
    kernel_cmdline,
)
from kernelmanager.image import build as build_mod
from kernelmanager.image.initramfs import Newc, modinfo
from kernelmanager.vm.qemu import TCG_CPU

REPO = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-system-x86_64")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="image builds need root")


# --------------------------------------------------------------------- helpers


def cpio_members(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of a newc archive (just enough to check ours)."""
    members: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad newc magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, data[pos : pos + size])
        pos += size
        pos += -pos % 4


def vmlinuz_version(path: Path) -> str:
    """The version string a bzImage carries in its setup header (boot protocol >= 2.0)."""
    data = path.read_bytes()
    assert data[0x202:0x206] == b"HdrS"
    (offset,) = struct.unpack_from("<H", data, 0x20E)
    start = offset + 0x200
    return data[start : data.index(b"\0", start)].decode()


def boot(
    image: GuestImage, extra_append: str, log: Path, timeout: float = 60
) -> tuple[int | None, str]:
    """Boot ``image`` under TCG with its disk in snapshot mode; return (exit code, console).

    The exit code is None when QEMU had to be killed at ``timeout``. QEMU runs in its own
    session and is always killed and reaped here, whatever happens.
    """
    assert QEMU, "qemu-system-x86_64 is not installed"
    machine = ["-accel", "tcg", "-cpu", TCG_CPU, "-m", "1024", "-smp", "1", "-machine", "microvm"]
    quiet = ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio"]
    disk = f"id=root,file={image.rootfs},format=raw,if=none,snapshot=on"
    argv = [QEMU, *machine, *quiet, "-kernel", str(image.kernel), "-initrd", str(image.initrd)]
    argv += ["-append", kernel_cmdline(tcg=True, extra=extra_append), "-no-reboot"]
    argv += ["-drive", disk, "-device", "virtio-blk-device,drive=root"]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    code: int | None
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        code = None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    console = out.decode(errors="replace")
    log.write_text(console)  # the evidence, kept in pytest's tmp dir
    return code, console


def no_commands(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"a cached build must not run commands: {args!r}")


# --------------------------------------------------------------------- the real image


@pytest.fixture(scope="session")
def image() -> GuestImage:
    if os.geteuid() != 0:
        pytest.skip("building the guest image needs root")
    return build_image(ImageRecipe(), cache_dir(), progress=Progress(stream=sys.stderr))


@pytest.mark.vm
def test_image_files_and_metadata(image: GuestImage) -> None:
    assert image.path == cache_dir() / "images" / ImageRecipe().digest()
    assert image.id == ImageRecipe().digest()
    for f in (image.kernel, image.initrd, image.rootfs, image.path / "image.json"):
        assert f.is_file(), f
    assert GuestImage.load(image.path) == image
    assert find_image(ImageRecipe()) == image
    meta = image.metadata()
    assert meta["sizes"]["rootfs_virtual"] == 2048 * 2**20 == image.rootfs.stat().st_size
    assert image.rootfs.stat().st_blocks * 512 < image.rootfs.stat().st_size  # sparse
    assert image.python_version.startswith("3.11.")
    names = {p.split("==")[0].lower() for p in image.packages}
    assert {"ipykernel", "pyzmq", "orjson", "numpy", "pandas", "matplotlib"} <= names
    assert all("==" in p for p in image.packages)
    assert not any(image.path.parent.glob(f".tmp-{image.id}-*"))


@pytest.mark.vm
def test_kernel_release_matches_kernel_and_modules(image: GuestImage) -> None:
    assert vmlinuz_version(image.kernel).split()[0] == image.kernel_release
    members = cpio_members(gzip.decompress(image.initrd.read_bytes()))
    order = members["lib/modules/load-order"][1].decode().split()
    assert order == image.metadata()["initramfs_modules"]
    assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_mmio")
    assert {"virtio_mmio", "virtio_blk", "virtio_console"} <= set(order)
    for name in order:
        vermagic = modinfo(members[f"lib/modules/{name}.ko"][1])["vermagic"][0]
        assert vermagic.split()[0] == image.kernel_release, name
    assert members["init"][0] & 0o111
    assert "dev/console" in members


@pytest.mark.vm
def test_second_build_is_a_noop(image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", no_commands)
    monkeypatch.setattr(subprocess, "Popen", no_commands)
    start = time.monotonic()
    again = build_image(ImageRecipe(), cache_dir(), progress=Progress(enabled=False))
    assert time.monotonic() - start < 2
    assert again == image


@pytest.mark.vm
def test_boot_selftest(image: GuestImage, tmp_path: Path) -> None:
    code, console = boot(image, "vmkg.init=/usr/local/bin/vmkg-selftest", tmp_path / "console.log")
    lines = [line for line in console.splitlines() if line.startswith("VMKG-SELFTEST")]
    assert lines, f"no self-test line (exit {code}); console:\n{console[-3000:]}"
    assert f"uname={image.kernel_release} " in lines[0]
    versions = dict(p.split("==") for p in image.packages)
    assert f"py=ipykernel={versions['ipykernel']} zmq={versions['pyzmq']} " in lines[0], lines[0]
    assert code == 0, "QEMU did not exit by itself after the guest rebooted"


@pytest.mark.vm
def test_boot_with_missing_init_fails_loudly_and_exits(image: GuestImage, tmp_path: Path) -> None:
    code, console = boot(image, "vmkg.init=/no/such/init", tmp_path / "console.log", timeout=30)
    assert "vmkg-initramfs: FATAL: init /no/such/init is missing" in console, console[-3000:]
    assert code == 0, "QEMU hung instead of exiting after the initramfs gave up"


@pytest.mark.vm
def test_agent_change_rebuilds_only_the_last_layer(image: GuestImage, tmp_path: Path) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    for f in (REPO / "guest").glob("*.py"):
        shutil.copy(f, src / f.name)
    marker = f"# vmkg-test-marker {time.time()}"
    (src / "vmkg_test_marker.py").write_text(marker + "\n")
    start = time.monotonic()
    new = build_image(ImageRecipe(), cache_dir(), guest_src=src, progress=Progress(enabled=False))
    try:
        took = time.monotonic() - start
        assert new.id != image.id
        assert new.packages == image.packages and new.kernel_release == image.kernel_release
        assert new.metadata()["base"] == image.metadata()["base"]
        log = (new.path / "build.log").read_text()
        assert "$ debootstrap" not in log and " pip " not in log, "the base was not reused"
        assert took < 60, f"agent-only rebuild took {took:.0f} s"
        debugfs = ["debugfs", "-R", "cat /opt/vmkg/guest/vmkg_test_marker.py", str(new.rootfs)]
        cat = subprocess.run(debugfs, capture_output=True, text=True, check=True)
        assert marker in cat.stdout
    finally:
        shutil.rmtree(new.path)
        (new.path.parent / f"{new.id}.lock").unlink(missing_ok=True)


@pytest.mark.vm
def test_too_small_disk_fails_clearly(image: GuestImage) -> None:
    recipe = ImageRecipe(disk_size_mb=300)
    with pytest.raises(ImageBuildError, match=r"does not fit in a 300 MiB disk.*--disk-size-mb"):
        build_image(recipe, cache_dir(), progress=Progress(enabled=False))
    images = cache_dir() / "images"
    assert not (images / recipe.digest()).exists()
    assert not any(images.glob(f".tmp-{recipe.digest()}-*"))
    # an expected failure: leave no lock or log behind in the shared cache
    (images / f"{recipe.digest()}.lock").unlink(missing_ok=True)
    (cache_dir() / "logs" / f"{recipe.digest()}.failed.log").unlink(missing_ok=True)


# --------------------------------------------------------------------- no image needed


def test_digest_changes_with_recipe_fields() -> None:
    base = ImageRecipe()
    assert base.digest() == ImageRecipe().digest()
    assert len(base.digest()) == 16
    others = [
        ImageRecipe(packages=("ipykernel", "numpy")),
        ImageRecipe(packages=(*base.packages, "scipy")),
        ImageRecipe(debian_suite="trixie"),
        ImageRecipe(mirror="http://ftp.debian.org/debian"),
        ImageRecipe(disk_size_mb=4096),
    ]
    digests = {r.digest() for r in others}
    assert base.digest() not in digests and len(digests) == len(others)
    # order and repeats of packages do not make a different image
    assert (
        ImageRecipe(packages=("matplotlib", "pandas", "numpy", "ipykernel", "numpy")).digest()
        == base.digest()
    )


def test_digest_changes_with_guest_sources(tmp_path: Path) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    for f in [*(REPO / "guest").glob("*.py"), *(REPO / "guest").glob("*.c")]:
        shutil.copy(f, src / f.name)
    if not (src / "agent.py").exists():
        (src / "agent.py").write_text("")
    recipe = ImageRecipe()
    first = recipe.digest(src)
    assert recipe.digest(src) == first
    with (src / "agent.py").open("a") as agent:
        agent.write("\n# changed\n")
    second = recipe.digest(src)
    assert second != first
    (src / "extra.py").write_text("X = 1\n")
    assert recipe.digest(src) not in (first, second)
    # the C sources compiled into the agent's directory count too
    before_c = recipe.digest(src)
    with (src / "fastout.c").open("a") as c:
        c.write("\n/* changed */\n")
    assert recipe.digest(src) != before_c
    # files that are not guest/*.py do not matter
    third = recipe.digest(src)
    (src / "notes.txt").write_text("hello")
    (src / "sub").mkdir()
    (src / "sub" / "x.py").write_text("")
    assert recipe.digest(src) == third


def test_digest_covers_the_builder_and_the_agent_not_the_rest_of_the_host_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder is host code (kernelmanager/image/); guest/ holds only what ships into
    the VM, and the image id covers both the builder and the agent sources."""
    assert build_mod.BUILDER_DIR == REPO / "kernelmanager" / "image"
    assert build_mod.GUEST_SRC == REPO / "guest"
    assert not (REPO / "guest" / "image").exists()
    recipe = ImageRecipe()
    before = recipe.digest()
    builder = tmp_path / "image"
    shutil.copytree(build_mod.BUILDER_DIR, builder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(build_mod, "BUILDER_DIR", builder)
    assert recipe.digest() == before
    with (builder / "disk.py").open("a") as f:
        f.write("\n# changed\n")
    assert recipe.digest() != before
    (builder / "disk.py").write_bytes((REPO / "kernelmanager" / "image" / "disk.py").read_bytes())
    (builder / "files" / "vmkg-init").write_text("changed")
    assert recipe.digest() != before


def test_recipe_validation() -> None:
    with pytest.raises(TypeError):
        ImageRecipe(packages="numpy")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ImageRecipe(disk_size_mb=10)
    with pytest.raises(ImageBuildError, match="not a pip requirement"):
        ImageRecipe(packages=("!!",)).digest()


@needs_root
def test_failed_build_names_package_and_leaves_nothing(tmp_path: Path) -> None:
    bad = "vmkg-no-such-package-xyz"
    recipe = ImageRecipe(packages=(bad,))
    start = time.monotonic()
    with pytest.raises(ImageBuildError) as info:
        build_image(recipe, tmp_path, progress=Progress(enabled=False))
    assert bad in str(info.value)
    assert "Hint:" in str(info.value)
    assert time.monotonic() - start < 120, "pip must fail before the minute-long debootstrap"
    images = tmp_path / "images"
    assert not any(p.name.startswith(".tmp-") for p in images.iterdir())
    assert not (images / recipe.digest()).exists()
    assert find_image(recipe, tmp_path) is None
    assert info.value.log and Path(info.value.log).is_file()
    assert bad in Path(info.value.log).read_text().splitlines()[-1]  # ends with the error
    assert not list((tmp_path / "bases").glob("*.tar.zst"))


@needs_root
def test_interrupted_build_removes_its_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []

    def interrupt(runner: object, reqs: object, suite: object, dest: Path) -> None:
        seen.extend((tmp_path / "images").glob(".tmp-*"))
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod.wheels, "download", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_image(ImageRecipe(packages=("numpy",)), tmp_path, progress=Progress(enabled=False))
    assert seen, "the build never reached its temp dir"
    assert not any(p.exists() for p in seen)
    assert not any((tmp_path / "images").glob(".tmp-*"))


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("geteuid", "needs root"),
        ("which", "apt-get install debootstrap"),
        ("statvfs", "not enough free disk space"),
    ],
)
def test_check_host_explains_what_is_missing(
    patch: str, message: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kernelmanager.image import runner

    monkeypatch.setattr(runner.os, "geteuid", lambda: 0)
    if patch == "geteuid":
        monkeypatch.setattr(runner.os, "geteuid", lambda: 1000)
    elif patch == "which":
        real = runner.which
        monkeypatch.setattr(runner, "which", lambda t: None if t == "debootstrap" else real(t))
    else:
        fake = os.statvfs_result((4096, 4096, 1000, 1000, 1000, 100, 100, 100, 0, 255, 0))
        monkeypatch.setattr(runner.os, "statvfs", lambda p: fake)
    with pytest.raises(ImageBuildError, match=message) as info:
        runner.check_host(tmp_path)
    assert "Hint:" in str(info.value)


def test_tsc_rate_only_from_a_trustworthy_cpuinfo(tmp_path: Path) -> None:
    from kernelmanager.image.cmdline import BASE, host_tsc_khz

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\ncpu MHz\t\t: 2596.120\nflags\t\t: fpu tsc constant_tsc\n")
    assert host_tsc_khz(cpuinfo, tmp_path / "none") == 2596120
    assert host_tsc_khz(cpuinfo, tmp_path) is None  # a cpufreq driver: MHz is not the TSC's
    cpuinfo.write_text("cpu MHz\t\t: 2596.120\nflags\t\t: fpu tsc\n")
    assert host_tsc_khz(cpuinfo, tmp_path / "none") is None
    assert kernel_cmdline(tcg=False, extra="vmkg.debug=1") == BASE + " vmkg.debug=1"
    assert kernel_cmdline(tcg=True).startswith(BASE)


def test_concurrent_build_waits_for_the_lock_then_finds_the_image(tmp_path: Path) -> None:
    """A second builder of the same recipe blocks on the lock and returns the first's image."""
    recipe = ImageRecipe(packages=("numpy",))
    image_id = recipe.digest()
    images = tmp_path / "images"
    images.mkdir()
    holder = textwrap.dedent(
        f"""
        import fcntl, json, os, sys, time
        from pathlib import Path
        images = Path({str(images)!r})
        fd = os.open(images / "{image_id}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(1.5)
        tmp = images / ".tmp-{image_id}-x"
        tmp.mkdir()
        for name in ("vmlinuz", "initrd.img", "rootfs.ext4"):
            (tmp / name).write_bytes(b"x")
        (tmp / "image.json").write_text(json.dumps({{"id": "{image_id}", "kernel": "vmlinuz",
            "initrd": "initrd.img", "rootfs": "rootfs.ext4", "kernel_release": "r",
            "python_version": "3.11.2", "packages": ["numpy==1"]}}))
        os.rename(tmp, images / "{image_id}")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        out = io.StringIO()
        start = time.monotonic()
        found = build_image(recipe, tmp_path, progress=Progress(stream=out))
        waited = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert found.id == image_id and found.packages == ("numpy==1",)
    assert waited > 1.0
    assert "waiting for another build" in out.getvalue()


def test_lock_is_exclusive(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with build_mod._flock(lock, Progress(enabled=False), "x"):
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_newc_archive_lists_with_cpio(tmp_path: Path) -> None:
    cpio = Newc()
    cpio.dir("bin")
    cpio.file("bin/busybox", b"\x7fELF" + b"x" * 13, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.chardev("dev/console", 5, 1)
    data = cpio.finish()
    assert len(data) % 4 == 0
    members = cpio_members(data)
    assert members["bin/busybox"] == (0o100755, b"\x7fELF" + b"x" * 13)
    assert members["bin/sh"] == (0o120777, b"busybox")
    if shutil.which("cpio"):
        listing = subprocess.run(
            ["cpio", "-itv"], input=data, capture_output=True, check=True
        ).stdout
        text = listing.decode()
        assert "bin/sh -> busybox" in text and "5,   1" in text.replace("5, 1", "5,   1")


def test_image_load_rejects_incomplete_dir(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="not a usable guest image"):
        GuestImage.load(tmp_path)
    (tmp_path / "image.json").write_text(
        json.dumps(
            {
                "id": "x",
                "kernel": "vmlinuz",
                "initrd": "i",
                "rootfs": "r",
                "kernel_release": "k",
                "python_version": "p",
                "packages": [],
            }
        )
    )
    with pytest.raises(ImageBuildError, match="lacks vmlinuz"):
        GuestImage.load(tmp_path)


def test_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMKG_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("VMKG_CACHE_DIR")
    expected = Path("/var/cache/vmkg") if os.geteuid() == 0 else Path.home() / ".cache/vmkg"
    assert cache_dir() == expected


def test_cli_path_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_mod.main(["path", "--cache-dir", str(tmp_path)]) == 1
    assert "is not built" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        build_mod.main(["build", "--help"])
    assert exit_info.value.code == 0
    assert "--packages" in capsys.readouterr().out


def test_progress_lines_without_tty() -> None:
    out = io.StringIO()
    progress = Progress(stream=out, total=2)
    with progress.step("first"):
        pass
    progress.skip("second", "cached")
    text = out.getvalue()
    assert "[1/2] first ..." in text and "done in" in text and "[2/2] second: cached" in text
    assert [t for t, _ in progress.timings] == ["first"]


def test_spinner_thread_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(out, "isatty", lambda: True, raising=False)
    progress = Progress(stream=out)
    before = threading.active_count()
    with pytest.raises(RuntimeError), progress.step("boom"):
        time.sleep(0.3)
        raise RuntimeError
    assert threading.active_count() == before
    assert "FAILED after" in out.getvalue()
