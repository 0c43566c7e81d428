"""The HTTP server (``controlstack serve``): sd-webui's API subset and ``/v1`` over the Python API.

A shell like ``cli/``: nothing imports it. ``app.create_app`` builds the FastAPI app; ``webui``
translates sd-webui's payloads.
"""
