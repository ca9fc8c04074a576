"""The service's Prometheus metrics (``GET /metrics``), one registry per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# no *_created series: the process start time says the same, and they double every label set
disable_created_metrics()

# Every kind of error the API answers with (the ``type`` of its JSON error body).
ERROR_KINDS = (
    "malformed_json",  # 400
    "not_found",  # 404
    "method_not_allowed",  # 405
    "body_too_large",  # 413
    "too_many_sentences",  # 413
    "invalid_request",  # 422: not {"text": [str, ...], ...}
    "invalid_option",  # 422: an option the search or the model does not accept
    "sentence_too_long",  # 422
    "invalid_sentence",  # 422: text the tokenizer refuses
    "queue_full",  # 503 (Retry-After)
    "not_ready",  # 503
    "shutting_down",  # 503
    "timeout",  # 504
    "client_disconnected",  # no answer: the client left before it
    "internal",  # 500
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "deltalm_serve_"
        self.requests = Counter(p + "requests", "Translate requests answered, by HTTP status", ["code"], registry=r)
        self.errors = Counter(p + "errors", "Requests that failed, by kind", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.latency = Histogram(p + "request_seconds", "Latency of translate requests (arrival to answer)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_sentences = Histogram(p + "batch_sentences", "Sentences per decoded batch",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(p + "batch_requests", "Requests sharing a decoded batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge(p + "queue_sentences", "Sentences waiting for a batch", registry=r)
        self.in_progress = Gauge(p + "requests_in_progress", "Translate requests accepted and not yet answered",
                                 registry=r)
        self.sentences = Counter(p + "sentences", "Sentences decoded", registry=r)
        self.target_tokens = Counter(p + "target_tokens", "Target tokens produced (every n-best hypothesis)",
                                     registry=r)
        self.source_tokens = Counter(p + "source_tokens", "Padded source tokens decoded (rows x longest)", registry=r)
        self.decode_seconds = Counter(p + "decode_seconds", "Time the worker spent decoding", registry=r)
        self.tokens_per_second = Gauge(p + "tokens_per_second",
                                       "Target tokens per second of decoding, over the last batch "
                                       "(rate(target_tokens_total) gives it per wall-clock second)", registry=r)
        self.ready = Gauge(p + "ready", "1 once the model is loaded and warmed up", registry=r)
