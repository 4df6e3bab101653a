"""The HTTP/WebSocket gateway (``vmkg serve``) and the ``vmkg`` command line."""
