"""Log output of ``vmkg serve``: one line per event, the kernel id in every line about a
kernel (``kernel <id>: ...``, the runtime's habit), optionally as JSON objects with the
kernel id as its own field for log pipelines (``--json-logs`` / ``$VMKG_JSON_LOGS``).
"""

from __future__ import annotations

import json
import logging
import re
import time

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "kernel_id"?, "exc"?}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        kernel_id = getattr(record, "kernel_id", None)
        if kernel_id is None:
            m = _UUID.search(message)
            kernel_id = m.group(0) if m else None
        if kernel_id:
            out["kernel_id"] = kernel_id
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: int | str, json_lines: bool) -> None:
    """Route every logger (ours, tornado's, jupyter_server's) through one stderr handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
