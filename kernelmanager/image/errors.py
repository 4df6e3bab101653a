"""The one exception the image builder raises (an ``ImageError`` of the runtime's tree).

    ImageBuildError          every failure a user can cause or meet while building
                             (not root, a tool missing, mirror/PyPI unreachable, disk
                             full, a package that does not exist, a tree too big ...)

Lower-level failures (a command exiting non-zero, ``OSError``) are translated into it
where they happen, with ``raise ImageBuildError(...) from exc``.
"""

from __future__ import annotations

from ..exceptions import ImageError


class ImageBuildError(ImageError):
    """A guest image could not be built (or loaded).

    ``str(exc)`` is one line: what went wrong, then what to do about it. ``details``
    holds the tail of the relevant command output (multi-line, may be empty) and
    ``log`` the full build log when one was kept.
    """

    def __init__(
        self, message: str, hint: str = "", *, details: str = "", log: str | None = None
    ) -> None:
        self.message = message
        self.hint = hint
        self.details = details
        self.log = log
        super().__init__(f"{message}. Hint: {hint}" if hint else message)
