"""Helpers for tests that drive a kernel through jupyter_client directly (no gateway)."""

from __future__ import annotations

import json
from typing import Any

from jupyter_client.manager import AsyncKernelManager


async def value(km: AsyncKernelManager, code: str, expr: str = "None", *,
                ready_timeout: float = 60, timeout: float = 120) -> Any:
    """Run ``code`` then return ``expr`` (JSON) from the kernel."""
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=ready_timeout)
        out: list[str] = []
        reply = await kc.execute_interactive(
            f"{code}\nimport json as _j; print('@@' + _j.dumps({expr}))", timeout=timeout,
            output_hook=lambda m: out.append(m["content"]["text"]) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] == "ok", reply["content"]
        line = [x for x in "".join(out).splitlines() if x.startswith("@@")][-1]
        return json.loads(line[2:])
    finally:
        kc.stop_channels()
