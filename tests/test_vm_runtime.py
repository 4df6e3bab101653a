"""The VM runtime through jupyter_client, with real QEMU microVMs restored from the
real template (guest kernel, agent, ipykernel)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from kernelmanager import paths, reaper
from kernelmanager.exceptions import TemplateIncompatible
from kernelmanager.runtime import Runtime
from kernelmanager.vm.qemu import qemu_version

pytestmark = pytest.mark.vm
KERNEL = "python3-microvm"


class Kernel:
    def __init__(self) -> None:
        self.km = KernelManager(kernel_name=KERNEL)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def vm(self):  # type: ignore[no-untyped-def]
        vk = self.km.provisioner.vm_kernel  # type: ignore[union-attr]
        assert vk is not None
        return vk

    def run(self, code: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
        out: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return "".join(out), reply["content"]

    def value(self, expr: str) -> Any:
        text, reply = self.run(f"import json as _j; print(_j.dumps({expr}))")
        assert reply["status"] == "ok", reply
        return json.loads(text)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


@pytest.fixture
def kernel(template: Any) -> Iterator[Kernel]:
    k = Kernel()
    yield k
    k.close()


def test_runs_in_the_guest_kernel_not_the_host(kernel: Kernel, template: Any) -> None:
    release = kernel.value("__import__('platform').release()")
    assert release == template.info["kernel_release"]
    assert release != os.uname().release
    procs = kernel.value(
        "[open(f'/proc/{p}/cmdline','rb').read().replace(b'\\0',b' ').decode() "
        "for p in __import__('os').listdir('/proc') if p.isdigit()]")
    user_procs = [p for p in procs if p]  # kernel threads have no command line
    assert not any("pytest" in p or "qemu" in p for p in user_procs), user_procs
    assert len(user_procs) < 10, user_procs  # the agent and the kernel, none of the host's
    assert kernel.value("__import__('os').getuid()") == 1000  # the kernel is not root in the guest
    assert kernel.value("__import__('os').getcwd()") == "/home/jovyan"
    assert kernel.value("sorted(__import__('os').listdir('/sys/class/net'))") == ["lo"]  # no network device


def test_clones_get_fresh_randomness_and_the_right_clock(template: Any) -> None:
    a, b = Kernel(), Kernel()
    try:
        code = "[__import__('os').urandom(16).hex(), __import__('random').random(), __import__('time').time()]"
        ra, rb = a.value(code), b.value(code)
        host_now = time.time()
        assert ra[0] != rb[0], "two clones share os.urandom"
        assert ra[1] != rb[1], "two clones share random.random()"
        assert abs(ra[2] - host_now) < 2 and abs(rb[2] - host_now) < 2
        assert a.value("__import__('socket').gethostname()") != b.value("__import__('socket').gethostname()")
    finally:
        a.close()
        b.close()


def test_interrupt_keeps_state_and_restart_clears_it(kernel: Kernel) -> None:
    assert kernel.run("x = 42")[1]["status"] == "ok"
    msg_id = kernel.kc.execute("while True: pass")
    time.sleep(1.5)
    kernel.km.interrupt_kernel()
    reply = kernel.kc.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # ipykernel aborts requests that arrive right after an error until its loop turns once
    time.sleep(0.5)
    assert kernel.value("x") == 42
    old_vm = kernel.vm.vm_id
    kernel.km.restart_kernel(now=True)
    kernel.kc.wait_for_ready(timeout=60)
    assert kernel.vm.vm_id != old_vm  # a fresh VM from the template
    text, reply = kernel.run("x")
    assert reply["status"] == "error" and reply["ename"] == "NameError"


def test_kill_9_of_qemu_is_noticed_and_leaves_nothing(template: Any) -> None:
    k = Kernel()
    workdir, pid = k.vm.workdir, k.vm.vm.pid
    conn_file = k.km.connection_file
    assert workdir.exists() and os.path.exists(conn_file)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while k.km.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not k.km.is_alive(), "poll() did not notice the dead VM"
    k.close()
    assert not workdir.exists()
    assert not os.path.exists(conn_file)
    assert reaper.process_start_time(pid) is None
    crashed = paths.state_dir() / "crashed"
    assert any(p.name.startswith(k.km.kernel_id) for p in crashed.iterdir())  # evidence kept


def test_host_end_reconnects_lose_and_duplicate_nothing(kernel: Kernel) -> None:
    rt = Runtime.instance()
    channel = kernel.vm.channel
    code = "import sys\nfor i in range(10000):\n    print(f'line {i}')\n    if i % 500 == 0: sys.stdout.flush()"
    msg_id = kernel.kc.execute(code)
    reconnects = 0
    chunks: list[str] = []
    done = False
    while not done:
        rt.run_sync(channel.reconnect(), timeout=20)  # what every restore does to the link
        reconnects += 1
        try:
            while True:
                msg = kernel.kc.get_iopub_msg(timeout=0.05)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    chunks.append(msg["content"]["text"])
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    done = True
                    break
        except Empty:
            pass
    lines = "".join(chunks).splitlines()
    assert reconnects >= 3, "the cell finished before the link was torn down often enough"
    assert lines == [f"line {i}" for i in range(10000)]
    assert kernel.kc.get_shell_msg(timeout=10)["parent_header"]["msg_id"] == msg_id


def test_connection_file_is_private_and_opens_only_its_own_kernel(template: Any) -> None:
    a, b = Kernel(), Kernel()
    try:
        for k in (a, b):
            assert stat.S_IMODE(os.stat(k.km.connection_file).st_mode) == 0o600
        info_a = json.loads(Path(a.km.connection_file).read_text())
        info_b = json.loads(Path(b.km.connection_file).read_text())
        assert info_a["key"] != info_b["key"]
        # a second client on the same file works alongside the first
        second = BlockingKernelClient(connection_file=a.km.connection_file)
        second.load_connection_file()
        second.start_channels()
        try:
            second.wait_for_ready(timeout=30)
            assert second.execute_interactive("y = 7", timeout=30)["content"]["status"] == "ok"
            assert a.value("y") == 7
        finally:
            second.stop_channels()
        # kernel A's key on kernel B's ports: dropped, never executed
        forged = BlockingKernelClient()
        forged.load_connection_info({**info_b, "key": info_a["key"]})
        forged.start_channels()
        try:
            forged.execute("z = 'forged'")
            with pytest.raises(Empty):
                forged.get_shell_msg(timeout=3)
        finally:
            forged.stop_channels()
        assert b.km.provisioner._relay.dropped >= 1  # type: ignore[union-attr]
        assert b.run("z")[1]["ename"] == "NameError"
    finally:
        a.close()
        b.close()


def test_incompatible_template_is_refused_clearly(template: Any) -> None:
    accel = template.machine.accel
    other = dataclasses.replace(template, qemu_version="1.0.0")
    with pytest.raises(TemplateIncompatible, match="QEMU 1.0.0"):
        other.check_restorable(qemu_version(), accel)
    with pytest.raises(TemplateIncompatible, match="protocol"):
        dataclasses.replace(template, protocol_version=0).check_restorable(qemu_version(), accel)
    template.check_restorable(qemu_version(), accel)  # the real one is fine


def test_owner_killed_with_sigkill_leaves_nothing_after_next_start(template: Any, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys, time
        from jupyter_client.manager import KernelManager
        km = KernelManager(kernel_name={KERNEL!r})
        km.start_kernel()
        vk = km.provisioner.vm_kernel
        print(json.dumps({{"dir": str(vk.workdir), "pid": vk.vm.pid, "conn": km.connection_file}}), flush=True)
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
    deadline = time.monotonic() + 10
    while reaper.process_start_time(info["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reaper.process_start_time(info["pid"]) is None, "QEMU outlived its owner"
    assert Path(info["dir"]).exists()  # what a crash leaves ...
    reaped = reaper.reap_orphans(paths.vms_dir())  # ... is reaped by the next start
    assert Path(info["dir"]).name in reaped
    assert not Path(info["dir"]).exists() and not os.path.exists(info["conn"])
