"""The warning of the deprecated ``gateway.sdk*`` modules, which re-export the SDK that
moved to the client distribution (``vmkg_client``) for one release.

The warning names the line that imported the old module (the interpreter skips
importlib's frames when counting ``stacklevel``), so Python's default filter shows it when
a script's own code does the import.
"""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """Called by the module ``old`` while it is imported."""
    # stacklevel 1: here, 2: the deprecated module, 3: whoever imported it
    warnings.warn(f"{old} is deprecated: import {new} instead (pip install vmkg-client; "
                  f"{old} goes away in the next release)", DeprecationWarning, stacklevel=3)
