"""The guest image builder: kernel, initramfs and ext4 root file system for the microVMs.

``python -m guest.image build`` builds (or finds) the image; the kernel manager uses
:func:`find_image` / :func:`build_image`, and boots it with :func:`kernel_cmdline`.
See :mod:`guest.image.build` for the cache layout and the steps.
"""

from .build import (
    GuestImage,
    ImageBuildError,
    ImageRecipe,
    Progress,
    build_image,
    cache_dir,
    find_image,
    main,
)
from .cmdline import kernel_cmdline

__all__ = [
    "GuestImage",
    "ImageBuildError",
    "ImageRecipe",
    "Progress",
    "build_image",
    "cache_dir",
    "find_image",
    "kernel_cmdline",
    "main",
]
