"""Where the runtime keeps things on the host.

- cache (images, templates): ``$VMKG_CACHE_DIR``, else /var/cache/vmkg as root,
  else ~/.cache/vmkg. Keyed by recipe hashes, so reuse across runs is safe.
- state (one directory per running VM: disk overlay, sockets, logs): ``$VMKG_STATE_DIR``,
  else /var/lib/vmkg as root, else ~/.local/state/vmkg. Each VM directory records its
  owner process; directories whose owner is gone are reaped at the next start.
- shm (RAM images of forks, which children map copy-on-write): ``$VMKG_SHM_DIR``,
  else /dev/shm/vmkg-<uid>.

The state and shm directories are private (``private_dir``): created 0700, and a
pre-existing one is used only if it is a real directory owned by us (a symlink, or a
directory another local user made first in the world-writable /dev/shm, is refused:
root would otherwise write fork images wherever it points). Jailed QEMUs never walk
these directories: their mount namespace binds in the few files each may see.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .exceptions import ConfigError

__all__ = ["cache_dir", "state_dir", "vms_dir", "templates_dir", "shm_dir", "private_dir",
           "ensure_shm_dir"]


def private_dir(path: Path) -> Path:
    """``path`` as a directory only this user can use: made 0700 if missing; refused
    (ConfigError) if it is a symlink, not a directory, or owned by someone else; a
    group/world bit on our own directory is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink or a file): refusing to use it; "
                          "remove it or point the setting elsewhere")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to this process (uid "
                          f"{os.geteuid()}): refusing to use it; remove it")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


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
    """The VM directories' parent, made private (0700) on the way."""
    private_dir(state_dir())
    return private_dir(state_dir() / "vms")


def templates_dir() -> Path:
    return cache_dir() / "templates"


def shm_dir() -> Path:
    env = os.environ.get("VMKG_SHM_DIR")
    return Path(env) if env else Path(f"/dev/shm/vmkg-{os.geteuid()}")


def ensure_shm_dir() -> Path:
    """The fork-image directory, created or checked safely (see ``private_dir``)."""
    return private_dir(shm_dir())
