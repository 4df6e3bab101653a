"""The ``%fork`` magic without a VM: its argument parsing, its display, and the code the
agent installs, run in a real IPython shell against a stand-in agent socket; the host's
validation of a guest's request; the gateway's per-kernel rate limit."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.forks import GuestForks
from guest import magic
from kernelmanager.exceptions import LimitExceeded
from kernelmanager.provisioner import parse_fork_request


def test_parse_line() -> None:
    assert magic.parse_line("") == {"count": 1, "reseed": True, "timeout": 30.0}
    assert magic.parse_line("3 --no-reseed --timeout 5") == {"count": 3, "reseed": False, "timeout": 5.0}
    assert magic.parse_line("--timeout=2.5 4") == {"count": 4, "reseed": True, "timeout": 2.5}
    for bad in ("0", "65", "-1", "2 3", "x", "--timeout", "--timeout -1", "--timeout 1e9", "--bogus", "'"):
        with pytest.raises(magic.ForkUsageError):
            magic.parse_line(bad)


def test_status_texts_escape_html() -> None:
    req = {"count": 2, "reseed": True, "timeout": 30.0}
    assert "forking once this cell finishes" in repr(magic.ForkStatus(req))
    done = magic.ForkStatus(req, kernels=["a" * 36, "b" * 36], parent_id="p")
    assert "branch 1: " + "b" * 36 in repr(done) and "Change Kernel" in repr(done)
    refused = magic.ForkStatus(req, error="<script>alert(1)</script>")
    assert "<script>" not in refused._repr_html_() and "&lt;script&gt;" in refused._repr_html_()
    assert magic.answer_status(req, b"not json").error
    assert magic.answer_status(req, b'{"ok": true, "kernels": ["k"], "parent_id": "p"}').kernels == ["k"]


class FakeAgent:
    """A Unix socket that answers one %fork request the way the agent forwards the host's."""

    def __init__(self, path: Path, answer: dict[str, Any]) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.answer = answer
        self.request: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        self.sock.close()
        with conn:
            self.request = json.loads(magic.read_line(conn))
            time.sleep(0.2)  # the cell is long done when the answer comes
            conn.sendall(json.dumps(self.answer).encode() + b"\n")


def test_installed_magic_displays_then_updates(tmp_path: Path) -> None:
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    path = tmp_path / "fork.sock"
    agent = FakeAgent(path, {"ok": True, "kernels": ["k0", "k1"], "parent_id": "parent"})
    shell = InteractiveShell.instance()
    try:
        shell.display_pub = CapturingDisplayPublisher()
        shell.run_cell(magic.install_code(str(path)))
        assert "_vmkg_ns" not in shell.user_ns
        result = shell.run_cell("%fork 2 --no-reseed")
        assert result.success
        agent.thread.join(10)
        assert agent.request == {"count": 2, "reseed": False, "timeout": 30.0}
        deadline = time.monotonic() + 10
        while len(shell.display_pub.outputs) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first, update = shell.display_pub.outputs[:2]
        assert not first["update"] and update["update"]
        assert first["transient"]["display_id"] == update["transient"]["display_id"]
        assert "branch 1: k1" in update["data"]["text/plain"]
        bad = shell.run_cell("%fork 99")
        assert not bad.success
    finally:
        InteractiveShell.clear_instance()


def test_host_validates_guest_requests() -> None:
    ok = parse_fork_request("k", {"count": 3, "reseed": False, "timeout": 10})
    assert (ok.count, ok.reseed, ok.timeout) == (3, False, 10.0)
    for body in ({"count": 0, "reseed": True, "timeout": 1}, {"count": True, "reseed": True, "timeout": 1},
                 {"count": 65, "reseed": True, "timeout": 1}, {"count": 1, "reseed": 1, "timeout": 1},
                 {"count": 1, "reseed": True, "timeout": 1e9}, {"count": 1, "reseed": True},
                 {"count": "1" * 10000, "reseed": True, "timeout": 1}):
        with pytest.raises(ValueError) as info:
            parse_fork_request("k", body)
        assert len(str(info.value)) < 300  # guest text is clipped


def test_rate_limit_per_kernel() -> None:
    class Mkm:
        removal_hooks: list[Any] = []

    forks = GuestForks(Mkm(), per_minute=2, window=0.5)
    forks._check_rate("a")
    forks._check_rate("a")
    forks._check_rate("b")  # per kernel
    with pytest.raises(LimitExceeded, match="rate limit"):
        forks._check_rate("a")
    time.sleep(0.6)
    forks._check_rate("a")
    Mkm.removal_hooks[0]("a")  # a removed kernel's history goes
    assert "a" not in forks._recent
