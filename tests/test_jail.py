"""The jail around each QEMU and the host files of section 5 of issue 9.

VM tests (marker ``vm``) restore real microVMs and read what the kernel says about the
QEMU process: /proc/<pid>/status, its mount namespace and root, its cgroup files; they
kill its owner with SIGKILL, fill the guest's disk, and fork. Pure tests check the
bounded log and the refusal of a hijacked /dev/shm directory without a VM.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.manager import AsyncKernelManager

from kernelmanager import forks, paths, reaper
from kernelmanager.exceptions import ConfigError, ForkBudgetExceeded
from kernelmanager.provisioner import fork
from kernelmanager.vm import cgroups
from kernelmanager.vm.jail import JailSettings
from kernelmanager.vm.qemu import BoundedLog

KERNEL = "python3-microvm"
vm = pytest.mark.vm


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


async def start() -> AsyncKernelManager:
    km = AsyncKernelManager(kernel_name=KERNEL)
    await km.start_kernel()
    return km


async def run(km: AsyncKernelManager, code: str, timeout: float = 120) -> str:
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = await kc.execute_interactive(
            code, timeout=timeout,
            output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out)
    finally:
        kc.stop_channels()


def vk_of(km: AsyncKernelManager) -> Any:
    vk = km.provisioner.vm_kernel  # type: ignore[union-attr]
    assert vk is not None
    return vk


@pytest.fixture
def private_shm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fork-image directory of this test's own (/dev/shm/vmkg-<uid> is shared by every
    vmkg process of this user on the host, whose forks would be counted too)."""
    d = Path(f"/dev/shm/vmkg-test-{os.getpid()}-{time.monotonic_ns()}")
    monkeypatch.setenv("VMKG_SHM_DIR", str(d))
    yield d
    for f in d.glob("*"):
        f.unlink()
    if d.exists():
        d.rmdir()


def cgroup_dirs(pid: int) -> dict[str, Path]:
    """controller -> the cgroup directory of ``pid`` (v1 controllers or v2's "")."""
    kind, mounts = cgroups.hierarchy()
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, rel = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            if c in mounts:
                out[c] = mounts[c] / rel.lstrip("/")
    return out


# ---------------------------------------------------------------------------
# without a VM


def test_bounded_log_keeps_the_latest_output_within_its_cap(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "console.log", 4096)
    for i in range(5000):
        log.write(f"line {i:05d}\n".encode())
    log.write(b"x" * 100_000)          # one huge write: only its tail is kept
    log.write(b"the end\n")
    log.close()
    data = (tmp_path / "console.log").read_bytes()
    assert len(data) <= 4096
    assert data.endswith(b"x" * 100 + b"the end\n")
    assert data.startswith(BoundedLog.MARK)
    assert log.dropped > 100_000


def test_shm_dir_hijack_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    shm = tmp_path / "vmkg-shm"
    monkeypatch.setenv("VMKG_SHM_DIR", str(shm))
    shm.symlink_to(target)                          # a symlink planted first
    with pytest.raises(ConfigError, match="symlink"):
        paths.ensure_shm_dir()
    shm.unlink()
    if os.geteuid() == 0:
        shm.mkdir()
        os.chown(shm, 4242, 4242)                   # a directory another user made first
        with pytest.raises(ConfigError, match="belongs to uid 4242"):
            paths.ensure_shm_dir()
        os.chown(shm, 0, 0)
        shm.chmod(0o777)
    else:
        shm.mkdir(mode=0o777)
    assert paths.ensure_shm_dir() == shm            # ours: tightened to 0700
    assert stat.S_IMODE(shm.stat().st_mode) == 0o700
    shm.rmdir()
    paths.ensure_shm_dir()
    assert stat.S_IMODE(shm.stat().st_mode) == 0o700 and not shm.is_symlink()


def test_fork_image_is_created_exclusively_never_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    planted = tmp_path / "fork-x.mem"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        forks.copy_dirty(os.getpid(), [], planted, 4096)
    assert victim.read_bytes() == b"precious"


# ---------------------------------------------------------------------------
# with real VMs

jailed = pytest.mark.skipif(os.geteuid() != 0 or not JailSettings.from_env().enabled,
                            reason="the jail needs root and VMKG_JAIL on")


def mount_options(pid: int, path: Path) -> list[str]:
    """The options of the mount that holds ``path`` in process ``pid``'s mount namespace."""
    best, opts = "", []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) > len(best):
            best, opts = point, line.split()[5].split(",")
    return opts


@vm
@jailed
async def test_qemu_runs_jailed_with_its_limits(template: Any) -> None:
    km = await start()
    try:
        vk = vk_of(km)
        pid = vk.vm.pid
        st = status(pid)
        settings = JailSettings.from_env()
        uids = {int(x) for x in st["Uid"].split()}
        assert uids == {settings.uid_base + pid}, st["Uid"]          # its own uid, never root
        assert {int(x) for x in st["Gid"].split()} == {settings.gid}
        assert st["Groups"] == str(settings.gid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
            assert int(st[cap], 16) == 0, (cap, st[cap])
        # its own mount namespace, whose root holds only what QEMU needs
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        root = Path(f"/proc/{pid}/root")
        assert set(os.listdir(root)) <= {"usr", "lib", "lib64", "bin", "sbin", "dev", "etc", "var", "tmp", "run"}
        assert os.listdir(root / "etc") == ["ld.so.cache"]
        assert sorted(os.listdir(root / "dev")) == ["null", "random", "urandom", "zero"]
        assert not (root / "root").exists() and not (root / "proc").exists()
        vms = os.listdir(root / str(paths.vms_dir()).lstrip("/"))
        assert vms == [vk.workdir.name]                          # no other VM's directory
        assert (root / str(template.mem_file).lstrip("/")).exists()
        # the template's files are mounted read-only there, its VM directory read-write
        assert "ro" in mount_options(pid, template.mem_file)
        assert "rw" in mount_options(pid, vk.disk_path)
        # QEMU's own seccomp filter, with the dangerous classes denied
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        sandbox = argv[argv.index(b"-sandbox") + 1].decode()
        for opt in ("on", "obsolete=deny", "elevateprivileges=deny", "spawn=deny", "resourcecontrol=deny"):
            assert opt in sandbox.split(","), sandbox
        # the VM directory: root's 0710; only the overlay is QEMU's; owner.json root's 0600
        wd = vk.workdir.stat()
        assert (wd.st_uid, stat.S_IMODE(wd.st_mode)) == (0, 0o710)
        disk = vk.disk_path.stat()
        assert (disk.st_uid, stat.S_IMODE(disk.st_mode)) == (settings.uid_base + pid, 0o600)
        owner = (vk.workdir / "owner.json").stat()
        assert (owner.st_uid, stat.S_IMODE(owner.st_mode)) == (0, 0o600)
        for d in (paths.state_dir(), paths.vms_dir()):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        # the cgroup holds the limits
        cg = cgroup_dirs(pid)
        mem = (template.machine.memory_mb + settings.mem_overhead_mb) << 20
        if "memory" in cg:
            assert int((cg["memory"] / "memory.limit_in_bytes").read_text()) == mem
            assert int((cg["pids"] / "pids.max").read_text()) == settings.pids
            assert int((cg["cpu"] / "cpu.cfs_quota_us").read_text()) == 100_000
        else:
            assert int((cg[""] / "memory.max").read_text()) == mem
            assert (cg[""] / "pids.max").read_text().strip() == str(settings.pids)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert "Max open files            1024" in limits
        # the console is a socket to the host, not a file QEMU writes
        fds = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        assert not any(f.endswith("console.log") or f.endswith("qemu.log") for f in fds)
        assert (await run(km, "print(6 * 7)")).strip() == "42"   # and the kernel works
        cg_paths = list(cg.values())
    finally:
        await km.shutdown_kernel(now=True)
    assert not any(p.exists() for p in cg_paths), "cgroup left after the VM ended"


@vm
@jailed
def test_jailed_qemu_dies_with_its_owner_and_its_cgroup_is_reaped(template: Any) -> None:
    script = textwrap.dedent(f"""
        import json, time
        from jupyter_client.manager import KernelManager
        km = KernelManager(kernel_name={KERNEL!r})
        km.start_kernel()
        vk = km.provisioner.vm_kernel
        cg = [l.split(":", 2)[2] for l in open(f"/proc/{{vk.vm.pid}}/cgroup") if "/vmkg/" in l]
        uid = open(f"/proc/{{vk.vm.pid}}/status").read().split("Uid:")[1].split()[0]
        print(json.dumps({{"pid": vk.vm.pid, "uid": int(uid), "cg": cg}}), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert info["uid"] != 0
    deadline = time.monotonic() + 10
    while reaper.process_start_time(info["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reaper.process_start_time(info["pid"]) is None, "the jailed QEMU outlived its owner"
    name = Path(info["cg"][0].strip()).name
    assert name
    _, mounts = cgroups.hierarchy()
    left = [m / cgroups.PARENT / name for m in mounts.values() if (m / cgroups.PARENT / name).exists()]
    assert left, "expected the dead owner's cgroup to remain until a reap"
    reaper.reap_orphans(paths.vms_dir())
    assert not any(p.exists() for p in left)


FILL = """
import errno, os
path = os.path.expanduser("~/fill")          # on the guest's disk (/tmp is tmpfs)
assert os.stat(os.path.dirname(path)).st_dev == os.stat("/").st_dev
st = os.statvfs("/")
free = st.f_bavail * st.f_frsize
chunk = b"\\1" * (1 << 20)
n, err = 0, None
try:
    with open(path, "wb") as f:
        if PREALLOCATE:  # unwritten extents: the guest's space is gone, the host's is not
            os.posix_fallocate(f.fileno(), 0, max(0, free - (160 << 20)))
            f.seek(0, 2)
        while True:
            f.write(chunk)
            n += 1
            if n % 32 == 0:
                f.flush(); os.fsync(f.fileno())
except OSError as e:
    err = errno.errorcode.get(e.errno)
print(n, err)
try:
    os.unlink(path)
except OSError:
    pass
"""


@vm
@jailed
async def test_guest_filling_its_disk_gets_enospc_and_the_host_loses_at_most_the_cap(template: Any) -> None:
    """The guest's own file system says ENOSPC; the host file never exceeds the cap
    (RLIMIT_FSIZE of QEMU). $VMKG_TEST_FULL_DISK=1 writes every byte (~1.4 GB, slow under
    TCG) instead of preallocating all but the last 160 MB."""
    km = await start()
    try:
        vk = vk_of(km)
        from kernelmanager.vm.jail import virtual_size
        vsize = virtual_size(vk.disk_path)
        assert vsize
        cap = vsize + vsize // 10 + (64 << 20)
        limits = Path(f"/proc/{vk.vm.pid}/limits").read_text()
        assert f"Max file size             {cap}" in limits, limits
        full = os.environ.get("VMKG_TEST_FULL_DISK") == "1"
        out = await run(km, f"PREALLOCATE = {not full}\n" + FILL, timeout=1800)
        n, err = out.split()
        assert err == "ENOSPC" and int(n) >= 100, out
        size = vk.disk_path.stat().st_size
        assert size <= cap, (size, cap)
        assert (await run(km, "print('alive')")).strip() == "alive"
    finally:
        await km.shutdown_kernel(now=True)


@vm
@jailed
async def test_a_disk_cap_below_the_disk_is_an_io_error_in_the_guest_not_host_growth(
        template: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``VMKG_DISK_CAP_MB`` below what the guest writes, the host file stops at the cap
    (the write fails with EFBIG in QEMU, an I/O error in the guest) and the VM lives on."""
    monkeypatch.setenv("VMKG_DISK_CAP_MB", "48")
    km = await start()
    try:
        vk = vk_of(km)
        out = await run(km, "PREALLOCATE = False\n" + FILL.replace("while True:", "while n < 200:"),
                        timeout=900)
        n, err = out.split()
        assert err in ("EIO", "EROFS"), out
        assert vk.disk_path.stat().st_size <= 48 << 20
        assert vk.vm.returncode is None
        assert (await run(km, "print('alive')")).strip() == "alive"
    finally:
        await km.shutdown_kernel(now=True)


@vm
@jailed
async def test_fork_files_are_private_and_the_budget_is_enforced(template: Any, private_shm: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    km = await start()
    children: list[AsyncKernelManager] = []
    try:
        await run(km, "x = 41")
        children = await fork(km, 1)
        child = vk_of(children[0])
        snap = child.snapshot
        d, gid = snap.path, JailSettings.from_env().gid
        shm = paths.shm_dir()
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(shm.stat().st_mode) == 0o700
        for name in ("owner.json", "state", "overlay.qcow2", "snapshot.json", "mem.path"):
            f = (d / name).stat()
            assert (f.st_uid, stat.S_IMODE(f.st_mode)) == (0, 0o600), name
        for f in (d / "disk.qcow2", snap.mem_file):
            s = f.stat()
            assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (0, gid, 0o640), f
        assert (await run(children[0], "print(x + 1)")).strip() == "42"
        # the budget: a fork past it is refused before anything is made
        before = set(os.listdir(shm))
        monkeypatch.setenv("VMKG_FORK_BUDGET_MB", "1")
        with pytest.raises(ForkBudgetExceeded, match="budget of 1 MB"):
            await fork(km, 1)
        assert set(os.listdir(shm)) == before
        assert (await run(km, "print(x)")).strip() == "41"     # the parent is unharmed
    finally:
        await asyncio.gather(*(k.shutdown_kernel(now=True) for k in [km, *children]),
                             return_exceptions=True)


@vm
@jailed
async def test_forks_of_forks_of_deleted_parents_keep_one_ram_image(template: Any, private_shm: Path) -> None:
    km = await start()
    await run(km, "x = 1")
    shm = private_shm
    before: set[str] = set()
    try:
        for gen in range(3):
            (child,) = await fork(km, 1)
            await km.shutdown_kernel(now=True)
            km = child
            assert (await run(km, "x += 1; print(x)")).strip() == str(gen + 2)
            images = {f for f in os.listdir(shm) if f.startswith("fork-")} - before
            assert len(images) == 1, images         # only the running child's own image
    finally:
        await km.shutdown_kernel(now=True)
    assert {f for f in os.listdir(shm) if f.startswith("fork-")} - before == set()
