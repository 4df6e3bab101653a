"""Deprecated: the SDK's kernel websocket moved to the client distribution, ``vmkg_client.websocket``
(``pip install vmkg-client``, which installs without the server). This module re-exports it
for one release and warns (DeprecationWarning) when imported."""

from __future__ import annotations

from typing import Any

import vmkg_client.websocket as _new
from vmkg_client.websocket import *  # noqa: F403

from .sdk_deprecation import warn_moved

warn_moved("gateway.sdk_websocket", "vmkg_client.websocket")


def __getattr__(name: str) -> Any:  # the names outside __all__ (constants, helpers)
    return getattr(_new, name)
