"""``python -m vmkg_client``: the ``vmkg-client`` command."""

from .cli import main

main()
