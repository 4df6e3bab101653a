"""Making a real fork fail inside QEMU, for the tests of fork error handling.

:class:`BlockDeviceState` watches a forks directory from a thread and, in every fork
directory that appears, puts a *directory* where the fork's device state file will go.
QEMU's ``xen-save-devices-state`` then fails (it cannot open a directory for writing):
a real QMP error from a real VM, in the middle of a real fork, after the parent was
frozen and paused. Works as root too (unlike a read-only directory).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType


class BlockDeviceState:
    def __init__(self, forks_dir: Path) -> None:
        self.forks_dir = forks_dir
        self.blocked: list[Path] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="block-device-state", daemon=True)

    def __enter__(self) -> BlockDeviceState:
        self.forks_dir.mkdir(parents=True, exist_ok=True)
        self._seen = set(os.listdir(self.forks_dir))
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            try:
                names = os.listdir(self.forks_dir)
            except FileNotFoundError:
                continue
            for name in names:
                if name in self._seen:
                    continue
                self._seen.add(name)
                try:
                    (self.forks_dir / name / "state").mkdir()
                    self.blocked.append(self.forks_dir / name)
                except OSError:  # already gone, or QEMU was faster
                    pass
