"""The kernel's lean write path (``guest.outstream``) without a VM: the same cells run in
two real local ipykernels, one as shipped and one with the code the agent installs at
bake time, and every stream message (its text, its stream, the cell it is attributed to)
and the cells' stream history (what ``%notebook`` saves) must come out the same. Both
forms of the lean write are checked: the Python one and the compiled one
(``guest/fastout.c``, built here as the image builder builds it)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

from guest import outstream
from kernelmanager.image import disk

REPO = Path(__file__).resolve().parents[2]

CELLS = [
    # a thread started here in this cell's context writes while the next cell runs:
    # ipykernel 7 attributes its output by the parent in the writer's context, and so
    # must the lean path
    "import os, sys, threading\nev = threading.Event()\n"
    "done = threading.Event()\n"
    "def late():\n    ev.wait(); sys.stdout.write('late, from a thread of cell 0\\n'); done.set()\n"
    "import contextvars\nt = threading.Thread(target=contextvars.copy_context().run, args=(late,)); t.start()\n"
    "print('a'); sys.stderr.write('b\\n'); print('c', end=''); sys.stdout.write('')\nprint(' d')",
    # (the thread writes between two writes of this cell, before either is flushed)
    "print('cell 1 before'); ev.set(); done.wait(); print('cell 1 after'); t.join()",
    # unusual input: a str subclass, then bytes (ipykernel's TypeError), a closed-over write
    "class S(str): pass\nsys.stdout.write(S('subclass\\n'))\n"
    "try:\n    sys.stdout.write(b'x')\nexcept TypeError as e:\n    print('TypeError:', e)\n"
    "w = sys.stdout.write; w('kept\\n'); sys.stdout.writelines(['l1\\n', 'l2\\n'])",
    # a forked child writes through ipykernel's own child path
    "pid = os.fork()\nif pid == 0:\n    sys.stdout.write('from the child\\n'); sys.stdout.flush(); os._exit(0)\n"
    "os.waitpid(pid, 0); print('parent')",
    "for i in range(20000): sys.stdout.write(f'{i:05d}\\n')",
    "from IPython.display import display\nprint('before'); display('shown'); print('after')",
    # written while the displayhook formats the result
    "class R:\n    def __repr__(self):\n        print('from repr')\n        return 'R()'\nprint('kept'); R()",
    "1/0",
]
#: the stream history (``%notebook``'s source) of the cells above, read in a last cell
HISTORY = ("{n: [(o.output_type, ''.join(o.bundle.get('stream', [])))"
           " for o in v] for n, v in sorted(get_ipython().history_manager.outputs.items())}")


@pytest.fixture
def kernels() -> Iterator[tuple[BlockingKernelClient, BlockingKernelClient]]:
    started: list[tuple[KernelManager, BlockingKernelClient]] = []
    try:
        for _ in range(2):
            started.append(start_new_kernel(kernel_name="python3", startup_timeout=60))
        yield started[0][1], started[1][1]
    finally:
        for km, kc in started:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def run(kc: BlockingKernelClient, code: str, ids: list[str]) -> dict[str, Any]:
    """Run a cell; its reply, and every stream message until it is idle, as
    (the index in ``ids`` of the cell it is attributed to, stream name, text)."""
    msg_id = kc.execute(code)
    ids.append(msg_id)
    streams: list[tuple[int, str, str]] = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        parent = msg["parent_header"].get("msg_id")
        if msg["msg_type"] == "stream":
            streams.append((ids.index(parent) if parent in ids else -1,
                            msg["content"]["name"], msg["content"]["text"]))
        elif msg["msg_type"] in ("display_data", "error"):
            streams.append((ids.index(parent), msg["msg_type"], ""))
        elif msg["msg_type"] == "status" and parent == msg_id and msg["content"]["execution_state"] == "idle":
            break
    # skip stale replies: on a loaded host start_new_kernel's wait_for_ready may have sent
    # kernel_info again before the first answer came, and returned on that first answer
    reply = kc.get_shell_msg(timeout=60)
    while reply["parent_header"].get("msg_id") != msg_id:
        assert reply["msg_type"] == "kernel_info_reply", reply
        reply = kc.get_shell_msg(timeout=60)
    return {"streams": streams, "reply": reply["content"]}


def merged(streams: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Consecutive pieces of one stream of one cell as one (where ipykernel cut its
    messages depends on timing, not on the write path)."""
    out: list[tuple[int, str, str]] = []
    for cell, name, text in streams:
        if out and out[-1][:2] == (cell, name) and name in ("stdout", "stderr"):
            out[-1] = (cell, name, out[-1][2] + text)
        else:
            out.append((cell, name, text))
    return out


def observe(kc: BlockingKernelClient) -> list[Any]:
    ids: list[str] = []
    seen = []
    for code in CELLS:
        r = run(kc, code, ids)
        seen.append((merged(r["streams"]), r["reply"]["status"], r["reply"].get("ename")))
    history = run(kc, f"print(repr({HISTORY}))", ids)["streams"]
    seen.append("".join(text for _, _, text in history))
    return seen


@pytest.fixture(scope="module")
def extension(tmp_path_factory: pytest.TempPathFactory) -> str:
    """guest/fastout.c compiled as the image builder compiles it for the guest."""
    source = REPO / "guest" / "fastout.c"
    dest = tmp_path_factory.mktemp("fastout") / disk.extension_name(source)
    assert dest.name == outstream.EXTENSION
    return str(disk.build_extension(source, dest))


@pytest.mark.parametrize("compiled", [False, True], ids=["python", "compiled"])
def test_lean_write_path_changes_nothing_but_its_cost(
        kernels: tuple[BlockingKernelClient, BlockingKernelClient], extension: str, compiled: bool) -> None:
    plain, lean = kernels
    code = outstream.install_code(extension if compiled else None)
    installed = run(lean, code + "print(get_ipython()._vmkg_lean_output)", [])
    assert installed["reply"]["status"] == "ok", installed
    want_installed = ["stdout", "stderr", "_tee", *(["compiled"] if compiled else [])]
    assert installed["streams"] == [(0, "stdout", f"{want_installed}\n")]
    # in every later cell both streams write through the lean path (under the lean _tee)
    probe = "import sys; print(sys.stdout.write.__qualname__, sys.stderr.write.__qualname__)"
    lean_name = "Writer.write" if compiled else "lean_write.<locals>.write"
    assert run(lean, probe, [])["streams"][0][2].split() == [lean_name] * 2
    assert run(plain, probe, [])["streams"][0][2].split() == ["InteractiveShell._tee.<locals>.write"] * 2
    run(plain, "pass", [])  # the same number of cells before the scenario in both kernels
    for kc in kernels:  # and the same (empty) stream history
        run(kc, "get_ipython().history_manager.outputs.clear()", [])

    want, got = observe(plain), observe(lean)
    assert got == want
    # and the scenario showed what it is meant to
    streams = [s for cell in want[:-1] for s in cell[0]]
    assert (0, "stdout", "late, from a thread of cell 0\n") in streams
    assert (1, "stdout", "cell 1 before\ncell 1 after\n") in streams
    assert any(text.startswith("subclass\nTypeError:") and text.endswith("kept\nl1\nl2\n") for _, _, text in streams)
    assert any("from the child\n" in text for _, _, text in streams)
    assert "".join(f"{i:05d}\n" for i in range(20000)) in [text for _, _, text in streams]
    assert "[('out_stream', 'a\\n'), ('err_stream', 'b\\n'), ('out_stream', 'c d\\n')]" in want[-1]
    assert any(text == "kept\nfrom repr\n" for _, _, text in streams)
    assert "('out_stream', 'kept\\nfrom repr\\n')" in want[-1]


def test_install_is_idempotent_and_leaves_other_streams_alone(kernels: tuple[BlockingKernelClient, BlockingKernelClient]) -> None:
    _, kc = kernels
    assert run(kc, outstream.install_code() + "print(get_ipython()._vmkg_lean_output)", [])["streams"][-1][2] \
        == "['stdout', 'stderr', '_tee']\n"
    # a second install finds the lean writes in place and changes nothing
    again = run(kc, outstream.install_code() + "print(get_ipython()._vmkg_lean_output)", [])
    assert again["streams"][-1][2] == "[]\n"
    # a stream that is not ipykernel's (here, redirected by the cell) is not touched
    r = run(kc, "import contextlib, io\nbuf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n"
                "    print('captured')\nprint(repr(buf.getvalue()))", [])
    assert r["streams"] == [(0, "stdout", "'captured\\n'\n")]


class _Stream:
    """Just what the compiled write reads of an ipykernel OutStream."""

    def __init__(self, put: Any) -> None:
        import contextvars
        import threading

        self.echo = None
        self.pub_thread = object()
        self._parent_header: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("parent")
        self._parent_header_global = {"msg_id": "global"}
        self._buffer_lock = threading.RLock()
        self._buffers: dict[Any, Any] = {}
        self._flush_pending = False
        self.flushes = 0
        self.put = put

    def _schedule_flush(self) -> None:
        self.flushes += 1
        self._flush_pending = True

    def write(self, text: Any) -> Any:  # ipykernel's own, for what is unusual
        return ("full", text)


def test_compiled_write_errors_let_go_of_the_lock_and_load_failures_fall_back(extension: str, tmp_path: Path) -> None:
    import sys
    compiled = outstream._COMPILED
    saved = list(compiled)
    compiled.clear()
    try:
        # no file, or a file that is no extension: the Python lean write stays
        assert outstream.load_extension(str(tmp_path / "none.so")) is False
        bad = tmp_path / outstream.EXTENSION
        bad.write_bytes(b"not an ELF file")
        assert outstream.load_extension(str(bad)) is False and not compiled
        assert outstream.load_extension(extension) is True
        module = compiled[0]

        class Buffer:
            def __init__(self) -> None:
                self.parts: list[str] = []

            def write(self, text: str) -> None:
                if text == "boom":
                    raise OSError("disk full")
                self.parts.append(text)

        buffer = Buffer()
        stream = _Stream(buffer)
        key = frozenset(stream._parent_header_global.items())
        stream._buffers[key] = buffer
        writer = module.Writer(stream, type(stream).write, [False])
        assert writer.write("a") == 1 and writer.write("bc") == 2
        assert buffer.parts == ["a", "bc"] and stream.flushes == 1
        with pytest.raises(OSError, match="disk full"):
            writer.write("boom")
        # the lock was let go: another thread can take it at once
        import threading
        taken: list[bool] = []

        def take() -> None:
            taken.append(stream._buffer_lock.acquire(timeout=5))
            if taken[-1]:
                stream._buffer_lock.release()

        t = threading.Thread(target=take)
        t.start()
        t.join()
        assert taken == [True]
        # a parent in the writer's context picks that parent's buffer; unusual input goes
        # to the full write; a closed stream too
        other = Buffer()
        stream._buffers[frozenset({"msg_id": "cell"}.items())] = other
        token = stream._parent_header.set({"msg_id": "cell"})
        assert writer.write("x") == 1 and other.parts == ["x"]
        stream._parent_header.reset(token)
        assert writer.write(b"bytes") == ("full", b"bytes")
        stream.pub_thread = None
        assert writer.write("closed") == ("full", "closed")
        # no reference is leaked per write
        stream.pub_thread = object()
        text = "y" * 10
        before = sys.getrefcount(text)
        for _ in range(1000):
            writer.write(text)
        buffer.parts.clear()
        assert sys.getrefcount(text) == before
        # what it is given is checked when it is made, not at a write
        with pytest.raises(AttributeError, match="publishing"):
            module.Writer(stream, type(stream).write, [False], history=object())
        with pytest.raises(TypeError):
            module.Writer(stream, type(stream).write, (False,))
    finally:
        compiled[:] = saved


def test_compiled_write_keeps_the_history_by_ipythons_flags(extension: str) -> None:
    """The flags that keep a write out of the cell's stream history (a display being
    published, the displayhook active, a traceback being shown), read from where they
    live: the compiled write must see each change as the Python one does."""
    assert outstream.load_extension(extension)
    module = outstream._COMPILED[0]

    class Obj:
        pass

    display_pub, displayhook, shell = Obj(), Obj(), Obj()
    display_pub._is_publishing = False  # type: ignore[attr-defined]
    displayhook._is_active = False  # type: ignore[attr-defined]
    shell.showing_traceback = False  # type: ignore[attr-defined]
    kept: list[str] = []

    class History:
        outputs_by_counter: dict[int, list[Any]] = {}
        execution_count = 1
        last: list[Any] = [None, None]
        publishing_at = (vars(display_pub), "_is_publishing")
        active_at = None  # read through its reader instead
        shell = None

        def publishing(self) -> bool:
            raise AssertionError("read from the instance dict instead")

        def active(self) -> bool:
            return bool(displayhook._is_active)  # type: ignore[attr-defined]

        def add(self, text: str) -> None:
            kept.append(text)

    history = History()
    history.shell = shell  # type: ignore[assignment]
    buffer = io.StringIO()
    stream = _Stream(buffer)
    stream._buffers[frozenset(stream._parent_header_global.items())] = buffer
    write = module.Writer(stream, type(stream).write, [False], history).write
    write("a")
    display_pub._is_publishing = True  # type: ignore[attr-defined]
    write("published")
    display_pub._is_publishing = False  # type: ignore[attr-defined]
    displayhook._is_active = True  # type: ignore[attr-defined]
    write("active")
    displayhook._is_active = False  # type: ignore[attr-defined]
    shell.showing_traceback = True  # type: ignore[attr-defined]
    write("traceback")
    shell.showing_traceback = False  # type: ignore[attr-defined]
    write("")
    write("b")
    assert buffer.getvalue() == "apublishedactivetracebackb"
    assert kept == ["a", "b"]


def test_compiled_write_keeps_new_output_in_its_own_buffers(extension: str) -> None:
    """Where ipykernel's buffer table has no buffer for the writer's parent yet, the
    compiled write puts a ``Buffer`` of its own there (one list append per write instead
    of a call of StringIO.write): ipykernel's own write and flush (write, getvalue, close)
    find it behaving as StringIO does, in the order written. A forked child's writes go
    to ipykernel's own write."""
    import collections
    import os
    import sys

    assert outstream.load_extension(extension)
    module = outstream._COMPILED[0]
    stream = _Stream(None)
    stream._buffers = collections.defaultdict(io.StringIO)
    writer = module.Writer(stream, type(stream).write, [False])
    assert writer.write("a") == 1
    (key, buffer), = stream._buffers.items()
    assert key == frozenset(stream._parent_header_global.items())
    assert type(buffer) is module.Buffer and not buffer.closed
    assert buffer.write("b\n") == 2  # ipykernel's own write, for what the writer leaves to it
    assert writer.write("é€") == 2 and writer.write("") == 0
    assert buffer.getvalue() == "ab\né€" and buffer.getvalue() == "ab\né€"
    # a new table (ipykernel's flush swapped it): a new buffer, the old one is left alone
    stream._buffers = collections.defaultdict(io.StringIO)
    assert writer.write("c") == 1
    assert stream._buffers[key].getvalue() == "c" and buffer.getvalue() == "ab\né€"
    # what StringIO refuses, it refuses
    with pytest.raises(TypeError, match="string argument expected, got 'bytes'"):
        buffer.write(b"x")
    buffer.close()
    assert buffer.closed
    for call in (lambda: buffer.write("x"), buffer.getvalue):
        with pytest.raises(ValueError, match="closed file"):
            call()
    with pytest.raises(TypeError):
        module.Buffer("initial")
    # no reference is leaked per write into it, once ipykernel's flush has read and closed it
    text = "z" * 10
    before = sys.getrefcount(text)
    for _ in range(1000):
        writer.write(text)
    assert sys.getrefcount(text) == before + 1000
    for flushed in stream._buffers.values():
        assert flushed.getvalue().endswith(text * 1000)
        flushed.close()
    assert sys.getrefcount(text) == before
    # a child made by fork: ipykernel's own write (its child path)
    stream._buffers = collections.defaultdict(io.StringIO)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, repr(writer.write("in the child")).encode())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert got == repr(("full", "in the child")) and not stream._buffers
    assert writer.write("parent") == 6  # the parent's own writer is unchanged
