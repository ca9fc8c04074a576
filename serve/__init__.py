"""``deltalm.serve``: the HTTP translation service (``deltalm serve DIR``) and its benchmark.

``app`` (FastAPI: endpoints, request / response models, errors, limits, streaming, the page),
``scheduler`` (one worker thread steps the ``Translator``'s search engine: in-flight or
request-level batching), ``metrics`` (Prometheus), ``server`` (uvicorn with a graceful SIGTERM),
``static`` (the page's HTML / JS / CSS), ``loadgen`` / ``bench`` (``deltalm bench-serve``).
Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client, sse-starlette, fastapi-offline).
"""
