"""Run by the image builder with the guest's python3, inside the guest tree (chroot).

Imports every module named on the command line and prints one JSON line:
{"python": "3.11.2", "ok": {"numpy": "2.4.6", ...}, "failed": {"x": "ImportError: ..."}}
Exit status 1 when any import failed. When matplotlib is installed it also builds
matplotlib's font cache (under $HOME/.cache), so the first plot in a kernel is not slow.
"""

import importlib
import json
import platform
import sys


def main() -> int:
    ok, failed = {}, {}
    for name in sys.argv[1:]:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # report every failure, not just the first
            failed[name] = f"{type(exc).__name__}: {exc}"
        else:
            ok[name] = str(getattr(module, "__version__", ""))
    try:
        import matplotlib.font_manager  # noqa: F401  (builds the font cache)
    except ImportError:
        pass
    print(json.dumps({"python": platform.python_version(), "ok": ok, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
