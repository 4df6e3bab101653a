"""``python -m guest.image``: see :func:`guest.image.build.main`."""

from .build import main

raise SystemExit(main())
