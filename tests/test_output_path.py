"""The guest's output path and per-cell costs (issue 11), on a real VM behind the gateway.

- IPython's history lives in memory (no SQLite writer thread committing after every
  cell on the VM's one emulated CPU), and ``%history`` still works.
- The kernel's stdout and stderr write through ``guest.outstream``'s lean path, compiled
  (``guest/fastout.c``; ``tests/unit/test_outstream.py`` shows both forms change nothing
  but the cost).
- The kernel's messages are packed with orjson (jupyter_client's choice when present).
- Output crosses the virtio-serial port from views of the protocol's frames (no copy per
  write, no joining of frames): 0.8 MB of distinct lines arrive exact and in order through the relay and
  the gateway.
"""

from __future__ import annotations

import pytest
from gateway_helpers import Channels, Gateway

from kernelmanager.snapshots import Snapshot

pytestmark = pytest.mark.vm


@pytest.mark.timeout(1800)  # a loaded TCG host: the gateway's pool, then 100,000 writes
async def test_history_in_memory_and_big_output_exact(gw: Gateway, template: Snapshot) -> None:
    # the bake installed it (the agent reports what it changed)
    # (compiled: guest/fastout.c, built into the image beside the agent)
    assert template.info["lean_output"] == ["stdout", "stderr", "_tee", "compiled"]
    kid = gw.start_kernel()["id"]
    ch = await Channels.open(gw, kid)
    try:
        hm = await ch.value("(get_ipython().history_manager.hist_file, get_ipython().history_manager.save_thread)")
        assert hm == [":memory:", None]
        # the kernel restored from the template writes through guest.outstream's lean path
        lean = "Writer.write"  # the compiled one
        assert await ch.value("[getattr(__import__('sys'), s).write.__qualname__ for s in ('stdout', 'stderr')]") \
            == [lean, lean]
        # under TCG the guest's CPU has no ERMS/FSRM, AVX/AVX2 or LA57
        # (kernelmanager.vm.qemu.TCG_CPU): with ERMS its kernel copies and clears memory a
        # byte per pass of translated code, with AVX numpy and zlib take TCG's slow paths
        flags = await ch.value("[f for f in ('erms', 'fsrm', 'avx', 'avx2', 'la57', 'rep_good') "
                               "if f in open('/proc/cpuinfo').read().split()]")
        assert flags == (["rep_good"] if template.machine.accel == "tcg" else flags), flags
        # and its kernel runs without its own speculation defences (templates.GUEST_CMDLINE)
        spectre_v2 = await ch.value("open('/sys/devices/system/cpu/vulnerabilities/spectre_v2').read()")
        assert spectre_v2.startswith("Vulnerable"), spectre_v2
        # and packs its messages with orjson (in every image), as jupyter_client does when it can
        assert await ch.value("get_ipython().kernel.session.pack.__name__") == "orjson_packer"
        r = await ch.execute("marker_cell = 1")
        assert r.reply["status"] == "ok", r.reply
        r = await ch.execute("%history -l 2")
        assert r.reply["status"] == "ok", r.reply
        assert "marker_cell = 1" in r.stdout
        # 0.8 MB of distinct lines, written in one go and in many pieces
        n = 100_000
        r = await ch.execute(f"import sys\nsys.stdout.write(''.join(f'{{i:07d}}\\n' for i in range({n // 2})))\n"
                             f"for i in range({n // 2}, {n}): sys.stdout.write(f'{{i:07d}}\\n')", timeout=1200)
        assert r.reply["status"] == "ok", r.reply
        assert r.stdout == "".join(f"{i:07d}\n" for i in range(n))
    finally:
        await ch.close()
        gw.delete_kernel(kid)
