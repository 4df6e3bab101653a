"""Step-by-step progress on stderr for the image builder.

``build_image`` announces each step as ``[3/7] debootstrap bookworm ...`` and, when
the step ends, how long it took. On a terminal a spinner with the elapsed time keeps
turning while a step runs; elsewhere (CI logs, pipes) each step is one plain line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_SPINNER = "|/-\\"


class Progress:
    """Reports build steps; pass ``Progress(enabled=False)`` to build silently.

    ``build_image`` calls :meth:`step` once per step (or :meth:`skip` when a cached
    result makes it unnecessary) and :meth:`info` for one-off remarks. ``timings``
    collects ``(title, seconds)`` for every step that ran.
    """

    def __init__(
        self, stream: TextIO | None = None, *, total: int = 7, enabled: bool = True
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.enabled = enabled
        self.timings: list[tuple[str, float]] = []
        self._n = 0
        isatty = getattr(self.stream, "isatty", None)
        self._tty = bool(isatty and isatty())

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def _next(self, title: str) -> str:
        self._n += 1
        return f"[{self._n}/{self.total}] {title}"

    def info(self, message: str) -> None:
        self._write(f"      {message}\n")

    def skip(self, title: str, reason: str) -> None:
        self._write(f"{self._next(title)}: {reason}\n")

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        label = self._next(title)
        start = time.monotonic()
        stop = threading.Event()
        spinner = None
        if self.enabled and self._tty:
            spinner = threading.Thread(target=self._spin, args=(label, start, stop), daemon=True)
            spinner.start()
        else:
            self._write(f"{label} ...\n")
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if spinner is not None:
                spinner.join()
            elapsed = time.monotonic() - start
            self.timings.append((title, round(elapsed, 2)))
            outcome = f"done in {elapsed:.1f} s" if ok else f"FAILED after {elapsed:.1f} s"
            if self._tty:
                self._write(f"\r\033[K{label} ... {outcome}\n")
            else:
                self._write(f"      {outcome}\n")

    def _spin(self, label: str, start: float, stop: threading.Event) -> None:
        i = 0
        while not stop.wait(0.2 if i else 0):
            elapsed = time.monotonic() - start
            self._write(f"\r\033[K{label} ... {_SPINNER[i % len(_SPINNER)]} {elapsed:.0f} s")
            i += 1
