"""Taking on a new identity after a restore: fresh entropy, the right clock, and the
in-kernel handler (installed at bake time) that renews the kernel process's state.

Only the standard library: it runs on the guest's Python.
"""

from __future__ import annotations

import ctypes
import fcntl
import struct

_libc = ctypes.CDLL(None, use_errno=True)


RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed_crng(entropy: bytes) -> None:
    """Mix host entropy into the CRNG and force a reseed (no VMGENID in the guest kernel)."""
    buf = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    with open("/dev/urandom", "wb") as f:
        fcntl.ioctl(f, RNDADDENTROPY, buf)
        fcntl.ioctl(f, RNDRESEEDCRNG)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def set_clock(time_ns: int) -> None:
    ts = _Timespec(time_ns // 1_000_000_000, time_ns % 1_000_000_000)
    if _libc.clock_settime(0, ctypes.byref(ts)) != 0:  # CLOCK_REALTIME
        raise OSError(ctypes.get_errno(), "clock_settime")


# Installed in the kernel process at bake time. After a restore the agent writes the
# new identity to RESTORE_FILE and sends SIGUSR2; the handler runs in the kernel's main
# thread (idle in its event loop, since snapshots are only taken of idle kernels) and
# reports on RESTORE_FIFO. That takes a millisecond where an execute_request takes
# a hundred under emulation.
RESTORE_FILE = "/run/vmkg/kernel/restore.json"
RESTORE_FIFO = "/run/vmkg/kernel/restore.done"

WARMUP_CODE = """\
def _vmkg_warmup(preload, restore_file, restore_fifo):
    import gc, json, os, random, signal, sys, uuid

    def on_restore(signum, frame):
        try:
            with open(restore_file) as f:
                req = json.load(f)
            os.environ.update(req["env"])
            if req["cwd"]:
                os.makedirs(req["cwd"], exist_ok=True)
                os.chdir(req["cwd"])
            if req["reseed"]:
                random.seed()
                np = sys.modules.get("numpy")
                if np is not None:
                    np.random.seed()
            if req.get("fork") is not None:  # a fork child's first start: which branch
                get_ipython().user_ns["__fork__"] = req["fork"]
            get_ipython().kernel.session.session = str(uuid.uuid4())
            result = "ok"
        except Exception as exc:
            result = "error: %s: %s" % (type(exc).__name__, exc)
        fd = os.open(restore_fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, result.encode() + b"\\n")
        finally:
            os.close(fd)

    signal.signal(signal.SIGUSR2, on_restore)
    for name in preload:
        __import__(name)
    gc.collect()
    gc.freeze()  # clones and forks then don't dirty pages by collecting old objects
_vmkg_warmup({preload!r}, {restore_file!r}, {restore_fifo!r})
del _vmkg_warmup
"""

