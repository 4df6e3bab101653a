"""What the reaper (kernelmanager.reaper) removes at a runtime's start, and what it spares.

A VM (or fork) directory is reaped when the owner recorded in its ``owner.json`` is gone:
dead, or its pid reused by another process (the start time differs). A directory whose
owner lives is kept, as is a young one without ``owner.json`` (a start in progress). A
recorded QEMU is killed only if its pid *and* start time still match. The owners and
"QEMU"s here are real processes of this test (``sleep``); directories are in tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelmanager.reaper import is_alive, process_start_time, reap_orphans


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> tuple[int, int]:
    """(pid, start time) of a process that has exited and been waited for."""
    proc = subprocess.Popen(["sleep", "0"])
    start = process_start_time(proc.pid)
    proc.wait()
    assert start is not None or process_start_time(proc.pid) is None
    return proc.pid, start or 1


def vm_dir(vms: Path, name: str, **owner: Any) -> Path:
    d = vms / name
    d.mkdir(parents=True)
    (d / "disk.qcow2").write_bytes(b"x")
    if owner:
        (d / "owner.json").write_text(json.dumps(owner))
    return d


def me() -> dict[str, Any]:
    return {"owner_pid": os.getpid(), "owner_start": process_start_time(os.getpid())}


def test_process_start_time_and_liveness(sleeper: subprocess.Popen[bytes]) -> None:
    start = process_start_time(sleeper.pid)
    assert isinstance(start, int) and start > 0
    assert is_alive(sleeper.pid, start)
    assert not is_alive(sleeper.pid, start + 1)  # same pid, another process (reused)
    assert not is_alive(sleeper.pid, None) and not is_alive(None, start) and not is_alive(0, start)
    pid, start = dead_pid()
    assert process_start_time(pid) is None or process_start_time(pid) != start
    assert not is_alive(pid, start)


def test_a_command_name_with_parentheses_and_spaces_does_not_confuse_the_parser() -> None:
    code = "import sys; open('/proc/self/comm', 'w').write(') x (y) 1 2'); print('ok', flush=True); sys.stdin.read()"
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            before = process_start_time(proc.pid)  # may still be python's own name
            assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == ") x (y) 1 2"
            assert process_start_time(proc.pid) == before
        finally:
            proc.kill()


def test_only_directories_of_dead_owners_are_reaped(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    vms = tmp_path / "vms"
    pid, start = dead_pid()
    alive = vm_dir(vms, "alive", **me())
    other_alive = vm_dir(vms, "other-owner", owner_pid=sleeper.pid, owner_start=process_start_time(sleeper.pid))
    dead = vm_dir(vms, "dead", owner_pid=pid, owner_start=start)
    reused = vm_dir(vms, "reused", owner_pid=os.getpid(), owner_start=me()["owner_start"] + 1)
    (vms / "stray-file").write_text("not a VM directory")
    reaped = reap_orphans(vms)
    assert sorted(reaped) == ["dead", "reused"]
    assert alive.is_dir() and other_alive.is_dir() and (vms / "stray-file").is_file()
    assert not dead.exists() and not reused.exists()
    assert reap_orphans(vms) == []  # idempotent


def test_unreadable_owner_records_are_reaped(tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    garbled = vm_dir(vms, "garbled")
    (garbled / "owner.json").write_text("{not json")
    empty = vm_dir(vms, "empty")
    (empty / "owner.json").write_text("{}")
    weird = vm_dir(vms, "weird")
    (weird / "owner.json").mkdir()  # reading it is an OSError
    assert sorted(reap_orphans(vms)) == ["empty", "garbled", "weird"]
    assert not vms.exists() or list(vms.iterdir()) == []


def test_a_young_directory_without_owner_is_a_start_in_progress(tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    young = vm_dir(vms, "young")
    old = vm_dir(vms, "old")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert reap_orphans(vms, min_age=30) == ["old"]
    assert young.is_dir()
    assert reap_orphans(vms, min_age=0) == ["young"]


def test_the_qemu_of_a_dead_owner_is_killed_and_its_files_removed(tmp_path: Path,
                                                                 sleeper: subprocess.Popen[bytes]) -> None:
    vms = tmp_path / "vms"
    pid, start = dead_pid()
    conn = tmp_path / "kernel-abc.json"
    conn.write_text("{}")
    ram = tmp_path / "fork-abc.mem"
    ram.write_bytes(b"ram")
    d = vm_dir(vms, "orphan", owner_pid=pid, owner_start=start, qemu_pid=sleeper.pid,
               qemu_start=process_start_time(sleeper.pid), connection_file=str(conn))
    (d / "mem.path").write_text(str(ram))
    assert reap_orphans(vms) == ["orphan"]
    assert sleeper.wait(10) == -signal.SIGKILL
    assert not conn.exists() and not ram.exists() and not d.exists()


def test_a_recycled_qemu_pid_is_never_killed(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    vms = tmp_path / "vms"
    pid, start = dead_pid()
    qemu_start = process_start_time(sleeper.pid)
    assert qemu_start is not None
    vm_dir(vms, "orphan", owner_pid=pid, owner_start=start, qemu_pid=sleeper.pid,
           qemu_start=qemu_start - 1)  # the pid now belongs to another process
    assert reap_orphans(vms) == ["orphan"]
    time.sleep(0.1)
    assert sleeper.poll() is None, "an unrelated process with a recycled pid was killed"


def test_a_live_owner_keeps_its_qemu(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    vms = tmp_path / "vms"
    vm_dir(vms, "mine", **me(), qemu_pid=sleeper.pid, qemu_start=process_start_time(sleeper.pid))
    assert reap_orphans(vms) == []
    assert sleeper.poll() is None


def test_no_vms_directory_is_nothing_to_do(tmp_path: Path) -> None:
    assert reap_orphans(tmp_path / "missing") == []
