"""The guest image builder: kernel, initramfs and ext4 root file system for the microVMs.

Host-side code: it runs on the host (as root, with debootstrap) and puts the ``guest``
package (the agent, the only code that ships into the VM) into the image.
``python -m kernelmanager.image build`` (or ``vmkg image build``) builds (or finds) the
image; the templates use :func:`find_image` / :func:`build_image`, and boot it with
:func:`kernel_cmdline`. See :mod:`kernelmanager.image.build` for the cache layout and the
steps.
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
