"""``python -m kernelmanager.image``: see :func:`kernelmanager.image.build.main`."""

from .build import main

raise SystemExit(main())
