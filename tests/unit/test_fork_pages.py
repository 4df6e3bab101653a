"""Fork page bookkeeping (kernelmanager.forks), without a VM.

A QEMU process maps its base RAM image ``MAP_PRIVATE``; the pages it wrote are private
anonymous copies. Here a real child process plays QEMU: it maps a file privately (at an
offset, as a RAM block may be), writes some pages and only reads others. The fork code
must find exactly the written pages in its ``/proc/PID/pagemap`` (``ram_vmas``,
``dirty_runs``), copy them out of ``/proc/PID/mem`` (``copy_dirty``), and complete the
image from the base file (``fill_from_base``) so that it equals what the child sees,
with the base's holes kept as holes. ``ForkRegistry`` counts the VMs using each fork
directory, along the chain of ancestors, and removes a directory at its last release.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelmanager.exceptions import ForkError
from kernelmanager.forks import (
    PAGE,
    ForkRegistry,
    copy_dirty,
    dirty_runs,
    fill_from_base,
    ram_vmas,
)
from kernelmanager.snapshots import Snapshot
from kernelmanager.vm.qemu import MachineSpec

PAGES = 64
#: the child maps the file from this page on (a RAM block need not start at offset 0)
MAP_FROM = 8
WRITTEN = [0, 1, 2, 7, 20, 21, 55]  # page numbers inside the mapping
READ = [3, 4, 30, 40]

CHILD = textwrap.dedent("""
    import ctypes, mmap, os, sys
    page = mmap.PAGESIZE
    path, first, written, read = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size - first * page
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                  offset=first * page)
    for p in map(int, written.split(",")):
        m[p * page:p * page + 5] = b"DIRTY"
    seen = sum(m[p * page] for p in map(int, read.split(",")))  # present, still the file's
    print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), seen, flush=True)
    sys.stdin.read()
""")


def base_content(page: int) -> bytes:
    return bytes([page % 251 + 1]) * PAGE


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A RAM image of MAP_FROM + PAGES pages, each filled with its own byte."""
    path = tmp_path / "base.mem"
    path.write_bytes(b"".join(base_content(p) for p in range(MAP_FROM + PAGES)))
    return path


@pytest.fixture
def child(base: Path) -> Iterator[tuple[int, int]]:
    """(pid, mapping address) of a process that mapped ``base`` privately and wrote to it."""
    with subprocess.Popen([sys.executable, "-c", CHILD, str(base), str(MAP_FROM),
                           ",".join(map(str, WRITTEN)), ",".join(map(str, READ))],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            addr = int(proc.stdout.readline().split()[0], 16)
            yield proc.pid, addr
        finally:
            proc.kill()


def runs_of(pages: list[int]) -> list[tuple[int, int]]:
    """(first page, count) of each run of consecutive page numbers."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def test_the_mapping_of_the_ram_file_is_found_with_its_offset(child: tuple[int, int], base: Path) -> None:
    pid, addr = child
    assert ram_vmas(pid, base) == [(addr, PAGES * PAGE, MAP_FROM * PAGE)]


def test_a_process_without_the_mapping_is_a_fork_error(base: Path) -> None:
    with pytest.raises(ForkError, match="not mapped"):
        ram_vmas(os.getpid(), base)


def test_exactly_the_written_pages_are_dirty(child: tuple[int, int], base: Path) -> None:
    pid, addr = child
    runs = dirty_runs(pid, ram_vmas(pid, base))
    expected = [(addr + p * PAGE, n * PAGE, (MAP_FROM + p) * PAGE) for p, n in runs_of(WRITTEN)]
    assert runs == expected  # read pages are present but file-backed: not dirty


def test_the_fork_image_equals_what_the_process_sees(child: tuple[int, int], base: Path,
                                                    tmp_path: Path) -> None:
    pid, _ = child
    size = base.stat().st_size
    runs = dirty_runs(pid, ram_vmas(pid, base))
    dest = tmp_path / "fork.mem"
    assert copy_dirty(pid, runs, dest, size) == len(WRITTEN) * PAGE
    assert dest.stat().st_size == size
    assert fill_from_base(base, dest, runs, size) == size - len(WRITTEN) * PAGE  # each byte once
    image = dest.read_bytes()
    for p in range(MAP_FROM + PAGES):
        page = image[p * PAGE:(p + 1) * PAGE]
        if p - MAP_FROM in WRITTEN:
            assert page == b"DIRTY" + base_content(p)[5:], p
        else:
            assert page == base_content(p), p



def test_a_process_that_exits_during_the_copy_is_a_fork_error_not_a_hang(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel shut down while a checkpoint copies its RAM: ``/proc/PID/mem``, opened
    while the process lived, reads as empty once it has exited. That must end the copy
    (it once looped for ever and kept the gateway from exiting). The child is killed
    after the first run is written."""
    with subprocess.Popen([sys.executable, "-c", CHILD, str(base), str(MAP_FROM),
                           ",".join(map(str, WRITTEN)), ",".join(map(str, READ))],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        runs = dirty_runs(proc.pid, ram_vmas(proc.pid, base))
        assert len(runs) > 1
        pwrite = os.pwrite

        def kill_after_first_write(fd: int, data: bytes, offset: int) -> int:
            n = pwrite(fd, data, offset)
            if proc.poll() is None:
                proc.kill()
                while Path(f"/proc/{proc.pid}/stat").read_text().split()[2] != "Z":
                    time.sleep(0.01)  # exited, not reaped: the pid stays ours
            return n

        monkeypatch.setattr(os, "pwrite", kill_after_first_write)
        with pytest.raises(ForkError, match="exited"):
            copy_dirty(proc.pid, runs, tmp_path / "fork.mem", base.stat().st_size)

def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_holes_in_the_base_stay_holes(tmp_path: Path) -> None:
    size = 256 * PAGE
    base = tmp_path / "sparse.mem"
    with open(base, "wb") as f:
        f.truncate(size)
        for p in (10, 11, 100, 200):
            f.seek(p * PAGE)
            f.write(base_content(p))
    dest = tmp_path / "fork.mem"
    with open(dest, "wb") as f:
        f.truncate(size)
        f.seek(11 * PAGE)
        f.write(b"D" * PAGE)  # a dirty page over one of the base's data pages
        f.seek(150 * PAGE)
        f.write(b"E" * PAGE)  # and one over a hole
    runs = [(0, PAGE, 11 * PAGE), (0, PAGE, 150 * PAGE)]  # (address, length, offset)
    copied = fill_from_base(base, dest, runs, size)
    data = dest.read_bytes()
    assert data[10 * PAGE:11 * PAGE] == base_content(10)
    assert data[11 * PAGE:12 * PAGE] == b"D" * PAGE  # the dirty page was not overwritten
    assert data[100 * PAGE:101 * PAGE] == base_content(100)
    assert data[150 * PAGE:151 * PAGE] == b"E" * PAGE
    assert data[200 * PAGE:201 * PAGE] == base_content(200)
    assert data.count(0) == size - 5 * PAGE
    # only the data of the base was copied (filesystems may round to their own block size)
    assert 3 * PAGE <= copied <= 3 * PAGE + 3 * 64 * 1024
    assert allocated(dest) < size // 4, "holes of the base were filled in"


def test_a_base_of_only_holes_copies_nothing(tmp_path: Path) -> None:
    base = tmp_path / "empty.mem"
    base.write_bytes(b"")
    os.truncate(base, 16 * PAGE)
    dest = tmp_path / "fork.mem"
    dest.write_bytes(b"")
    os.truncate(dest, 16 * PAGE)
    assert fill_from_base(base, dest, [], 16 * PAGE) == 0
    assert dest.read_bytes() == bytes(16 * PAGE)


# -- ForkRegistry ------------------------------------------------------------------------------


def snapshot(path: Path, kind: str = "fork", ancestors: tuple[Path, ...] = ()) -> Snapshot:
    path.mkdir(parents=True, exist_ok=True)
    return Snapshot(path=path, mem_file=path / "mem", state_file=path / "state", disk=path / "disk.qcow2",
                    machine=MachineSpec(), qemu_version="8.2", protocol_version=1, image_id="img",
                    created=time.time(), kind=kind,
                    info={"ancestors": [str(a) for a in ancestors]} if kind == "fork" else {})


def fork_dir(root: Path, name: str, shm: Path) -> Path:
    """A fork directory whose RAM image lives elsewhere (tmpfs, named by mem.path)."""
    d = root / name
    d.mkdir()
    mem = shm / f"fork-{name}.mem"
    mem.write_bytes(b"ram")
    (d / "mem.path").write_text(str(mem))
    return d


def test_templates_need_no_fork_directory(tmp_path: Path) -> None:
    reg = ForkRegistry()
    tpl = snapshot(tmp_path / "template", kind="template")
    assert ForkRegistry.chain(tpl) == []
    reg.acquire(tpl)
    reg.release(tpl)
    assert (tmp_path / "template").is_dir()  # never removed by the registry


def test_fork_directories_live_while_any_vm_of_their_chain_does(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    a_dir = fork_dir(tmp_path, "a", shm)
    b_dir = fork_dir(tmp_path, "b", shm)
    a = snapshot(a_dir)
    b = snapshot(b_dir, ancestors=(a_dir,))  # forked from a VM restored from a
    assert ForkRegistry.chain(b) == [b_dir, a_dir]
    reg = ForkRegistry()
    reg.acquire(a)  # a branch restored from a
    reg.acquire(a)  # another one
    reg.acquire(b)  # a branch of a branch: its disk backs onto a's
    assert (reg.count(a_dir), reg.count(b_dir)) == (3, 1)
    reg.release(a)
    reg.release(a)
    assert a_dir.is_dir() and reg.count(a_dir) == 1  # b's VM still needs a
    reg.release(b)
    assert (reg.count(a_dir), reg.count(b_dir)) == (0, 0)
    assert not a_dir.exists() and not b_dir.exists()
    assert list(shm.iterdir()) == []  # the RAM images on tmpfs went with them


def test_a_released_chain_removes_the_descendant_first_but_keeps_shared_ancestors(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    a_dir, b_dir, c_dir = (fork_dir(tmp_path, n, shm) for n in "abc")
    b = snapshot(b_dir, ancestors=(a_dir,))
    c = snapshot(c_dir, ancestors=(a_dir,))  # a sibling of b, same parent fork
    reg = ForkRegistry()
    reg.acquire(b)
    reg.acquire(c)
    reg.release(b)
    assert not b_dir.exists() and a_dir.is_dir() and c_dir.is_dir()
    assert sorted(p.name for p in shm.iterdir()) == ["fork-a.mem", "fork-c.mem"]
    reg.release(c)
    assert not a_dir.exists() and not c_dir.exists() and list(shm.iterdir()) == []
