"""The HTTP server (``controlstack serve``): sd-webui's API subset and ``/v1`` over the Python API.

A shell like ``cli/``: nothing imports it. ``app.create_app`` builds the FastAPI app; ``bodies``
reads JSON bodies under caps before parsing; ``spec`` validates a generation into a ``JobSpec``
(``/v1`` directly, sd-webui's payloads through ``webui``); ``annotate`` takes annotator parameters
as content only; ``jobs`` queues ``/v1`` jobs; ``ui`` is the web UI. docs/serving.md is the contract.
"""
