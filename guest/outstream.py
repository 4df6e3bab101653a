"""A lean write path for the kernel's ``sys.stdout`` and ``sys.stderr``.

Runs in the *kernel* process, like ``guest.magic``: at bake time the agent executes this
module's source in the kernel (``install_code``), so every kernel restored from a template
has it. Only the standard library, ipykernel and IPython.

Why: on an emulated CPU every Python operation is dear, and one ``sys.stdout.write`` went
through two layers that redo per write what only changes per cell. ipykernel's
``OutStream.write`` rebuilds a ``frozenset`` of the parent header (to find the cell's
buffer) and asks the OS for the pid; IPython's ``_tee`` (the stream history behind
``%notebook``) builds a list of three flags and looks up the cell's history entry again.
Together ~200 us of TCG time per write: 200,000 small writes kept the kernel busy 40 s.

What changes is only *how* each write finds its place, never where it goes:

- ``write``: the same buffer as ipykernel's (one per parent header, under its lock), found
  by identity of the parent header and of the buffer table since the last write, so the
  routing of output to the cell (or thread, or task) that wrote it is ipykernel's own.
  Anything unusual (a ``str`` subclass, a forked child process, an echo stream, a closed
  stream) goes through ipykernel's own ``write``.
- ``_tee``: IPython's rule for the cell's stream history, with the history entry of the
  last write remembered, kept by the same lean write for the cell's duration (one Python
  call per write: under TCG the second cost as much as the first); restored after the
  cell even if the cell raised.

The same steps are compiled in ``guest/fastout.c`` (the image builder makes
``_vmkg_fastout.abi3.so`` of it beside the agent): with no interpreted frame per write,
a write costs the kernel a few calls into C. The compiled form also gives a parent that
has no buffer yet one of its own (``Buffer``: StringIO's write, getvalue and close over a
list of the pieces, so a write is one list append; ipykernel's flush reads it as it reads
a StringIO). ``install`` loads it when given its path and
uses it for both streams; without it (or if it fails to load) this module's Python
``write`` does the same, slower.

If the installed ipykernel or IPython lacks what this relies on, nothing is changed (the
install reports it), so a template built on other versions still works, at their speed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

#: the OutStream attributes the lean write relies on (ipykernel 7)
NEEDED = ("_parent_header", "_parent_header_global", "_buffer_lock", "_buffers",
          "_flush_pending", "_schedule_flush", "echo", "pub_thread", "_master_pid")


#: set in a child process made by fork (its writes take ipykernel's own path)
_FORKED = [False]
#: the compiled lean write (``guest/fastout.c``), once ``load_extension`` found it
_COMPILED: list[Any] = []
#: the file name the image builder gives the compiled lean write
EXTENSION = "_vmkg_fastout.abi3.so"
os.register_at_fork(after_in_child=lambda: _FORKED.__setitem__(0, True))


class CellHistory:
    """IPython's rule for a cell's stream history (``InteractiveShell._tee``: what
    ``%notebook`` saves), with the history entry appended to last remembered."""

    def __init__(self, shell: Any, history_output: type, channel: str) -> None:
        self.shell = shell
        self.history_output = history_output
        self.execution_count = shell.execution_count
        self.outputs_by_counter = shell.history_manager.outputs
        self.output_type = "out_stream" if channel == "stdout" else "err_stream"
        # readers of IPython's two flags; where a flag is a plain attribute behind its
        # property, also (the instance dict, the key) for the compiled write to read
        self.publishing, self.publishing_at = _flag(shell.display_pub, "is_publishing")
        self.active, self.active_at = _flag(shell.displayhook, "is_active")
        self.last: list[Any] = [None, None]  # the entry written to last, its list of chunks

    def wanted(self, data: Any) -> bool:
        return bool(data) and not (self.publishing() or self.active() or self.shell.showing_traceback)

    def add(self, data: Any) -> None:
        outputs = self.outputs_by_counter.get(self.execution_count)
        if outputs and outputs[-1] is self.last[0]:
            self.last[1].append(data)
            return
        entry = outputs[-1] if outputs and outputs[-1].output_type == self.output_type else None
        if entry is None:
            entry = self.history_output(output_type=self.output_type, bundle={"stream": []})
            self.outputs_by_counter[self.execution_count].append(entry)
        chunks = entry.bundle["stream"]
        self.last[0], self.last[1] = entry, chunks
        chunks.append(data)


def lean_write(stream: Any, history: CellHistory | None = None) -> Callable[[Any], Any]:
    """A ``write`` for ``stream`` (an ipykernel ``OutStream``) with ipykernel's effect and,
    given the running cell's ``history``, IPython's ``_tee``'s as well: one Python call
    per write instead of two (the second cost as much as the first)."""
    full_write = type(stream).write
    forked = _FORKED if os.getpid() == stream._master_pid else [True]
    if _COMPILED:  # the same steps, compiled
        return _COMPILED[0].Writer(stream, full_write, forked, history).write
    get_parent = stream._parent_header.get
    lock = stream._buffer_lock
    # the parent header, the buffer table and that parent's buffer's write, as of last time
    last: list[Any] = [None, None, None]
    if history is not None:
        publishing, active, shell = history.publishing, history.active, history.shell
        by_counter, count, seen = history.outputs_by_counter, history.execution_count, history.last

    def write(string: Any) -> Any:
        if type(string) is not str or forked[0] or stream.echo is not None or stream.pub_thread is None:
            result = full_write(stream, string)
        else:
            try:
                parent = get_parent()
            except LookupError:
                parent = stream._parent_header_global
            with lock:
                buffers = stream._buffers
                if parent is last[0] and buffers is last[1]:
                    last[2](string)
                else:
                    put = buffers[frozenset(parent.items())].write
                    last[0], last[1], last[2] = parent, buffers, put
                    put(string)
            if not stream._flush_pending:
                stream._schedule_flush()
            result = len(string)
        if history is not None and string and not (publishing() or active() or shell.showing_traceback):
            outputs = by_counter.get(count)
            if outputs and outputs[-1] is seen[0]:
                seen[1].append(string)
            else:
                history.add(string)
        return result

    write.__doc__ = full_write.__doc__
    return write


def lean_tee(shell: Any, history_output: type, writes: dict[str, tuple[Any, Any]]) -> Callable[..., Any]:
    """IPython's ``InteractiveShell._tee`` (stream output kept for the cell's history).

    ``writes`` maps a channel to (its stream, that stream's lean write): while the channel
    is still that stream, the cell writes through one lean write that also keeps the
    history, and the lean write is what is left in place after the cell (IPython's own
    ``_tee`` puts back whatever it found, which for the cell that installed this is
    ipykernel's full write). Any other stream (one a cell redirected, say) is wrapped as
    IPython wraps it."""

    @contextlib.contextmanager
    def _tee(channel: str) -> Iterator[None]:
        stream = getattr(sys, channel)
        ours = writes.get(channel)
        history = CellHistory(shell, history_output, channel)
        if ours is not None and ours[0] is stream:
            original_write = ours[1]
            write = lean_write(stream, history)
        else:
            original_write = stream.write

            def write(data: Any, *args: Any, **kwargs: Any) -> Any:
                result = original_write(data, *args, **kwargs)
                if history.wanted(data):
                    history.add(data)
                return result

        stream.write = write
        try:
            yield
        finally:
            stream.write = original_write

    _tee.vmkg_lean = True  # type: ignore[attr-defined]
    return _tee


def _flag(obj: Any, name: str) -> tuple[Callable[[], Any], tuple[dict[str, Any], str] | None]:
    """A reader of ``obj.<name>``, and where it reads from: IPython's flags are properties
    that return a ``_<name>`` attribute; where that is all the property does, reading the
    attribute (in the instance dict) spares a Python call per write."""
    state, prop = vars(obj), getattr(type(obj), name, None)
    code = getattr(getattr(prop, "fget", None), "__code__", None)
    if isinstance(prop, property) and code is not None and code.co_names == ("_" + name,) \
            and "_" + name in state:
        return functools.partial(state.__getitem__, "_" + name), (state, "_" + name)
    return functools.partial(getattr, obj, name), None


def load_extension(path: str) -> bool:
    """Use the compiled lean write in ``path`` (``guest/fastout.c``'s build) from now on;
    False, and the Python one stays, if there is none or it does not load here."""
    import importlib.machinery
    import importlib.util

    if _COMPILED:
        return True
    if not os.path.isfile(path):
        return False
    loader = importlib.machinery.ExtensionFileLoader("_vmkg_fastout", path)
    spec = importlib.util.spec_from_file_location("_vmkg_fastout", path, loader=loader)
    try:
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        loader.exec_module(module)
    except (ImportError, OSError):
        return False
    _COMPILED.append(module)
    return True


def install(shell: Any, extension: str | None = None) -> list[str]:
    """Give the kernel's output streams the lean path; what was changed, by name, and
    ``"compiled"`` if the writes are ``extension``'s compiled ones."""
    writes: dict[str, tuple[Any, Any]] = {}
    try:
        from ipykernel.iostream import OutStream
        from IPython.core.history import HistoryOutput
    except ImportError:
        return []
    if getattr(vars(shell).get("_tee"), "vmkg_lean", False):
        return []  # installed already
    compiled = extension is not None and load_extension(extension)
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if type(stream) is OutStream and all(hasattr(stream, a) for a in NEEDED):
            writes[name] = (stream, lean_write(stream))
    if not writes or getattr(type(shell), "_tee", None) is None \
            or not hasattr(shell.history_manager, "outputs"):
        return []
    shell._tee = lean_tee(shell, HistoryOutput, writes)
    for stream, write in writes.values():
        stream.write = write  # until a running cell's own _tee puts back what it found
    return [*writes, "_tee", *(["compiled"] if compiled else [])]


def install_code(extension: str | None = None) -> str:
    """Code the agent executes in the kernel at bake time, with the compiled lean write
    at ``extension`` if given; what it changed (``install``'s list) is left in the
    shell's ``_vmkg_lean_output``."""
    from guest.magic import kernel_code  # agent side only: never run in the kernel

    return kernel_code(__name__, "vmkg_outstream", "<vmkg outstream>",
                       f"get_ipython()._vmkg_lean_output = _vmkg_ns['install'](get_ipython(), {extension!r})")
