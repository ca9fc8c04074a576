"""``deltalm.serve``: the HTTP translation service (``deltalm serve DIR``) and its benchmark.

``app`` (FastAPI: endpoints, request / response models, errors, limits), ``batcher`` (dynamic
batching over one worker thread that owns the ``Translator``), ``metrics`` (Prometheus),
``server`` (uvicorn with a graceful SIGTERM), ``loadgen`` / ``bench`` (``deltalm bench-serve``).
Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client).
"""
