"""Where the runtime keeps things on the host.

- cache (images, templates): ``$VMKG_CACHE_DIR``, else /var/cache/vmkg as root,
  else ~/.cache/vmkg. Keyed by recipe hashes, so reuse across runs is safe.
- state (one directory per running VM: disk overlay, sockets, logs): ``$VMKG_STATE_DIR``,
  else /var/lib/vmkg as root, else ~/.local/state/vmkg. Each VM directory records its
  owner process; directories whose owner is gone are reaped at the next start.
- shm (RAM images of forks, which children map copy-on-write): ``$VMKG_SHM_DIR``,
  else /dev/shm/vmkg-<uid>.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "state_dir", "vms_dir", "templates_dir", "shm_dir"]


def cache_dir() -> Path:
    """$VMKG_CACHE_DIR, else /var/cache/vmkg for root, else ~/.cache/vmkg."""
    env = os.environ.get("VMKG_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/vmkg")
    return Path.home() / ".cache" / "vmkg"


def state_dir() -> Path:
    env = os.environ.get("VMKG_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/vmkg")
    return Path.home() / ".local" / "state" / "vmkg"


def vms_dir() -> Path:
    return state_dir() / "vms"


def templates_dir() -> Path:
    return cache_dir() / "templates"


def shm_dir() -> Path:
    env = os.environ.get("VMKG_SHM_DIR")
    return Path(env) if env else Path(f"/dev/shm/vmkg-{os.geteuid()}")
