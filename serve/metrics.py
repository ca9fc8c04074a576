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
    "client_disconnected",  # no answer (499 in requests_total): the client left before it
    "internal",  # 500
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ADMITTED_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "deltalm_serve_"
        self.requests = Counter(p + "requests", "Translate requests answered, by HTTP status", ["code"], registry=r)
        self.errors = Counter(p + "errors", "Requests that failed, by kind", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.latency = Histogram(
            p + "request_seconds",
            "Latency of translate requests (arrival to answer)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            p + "queue_sentences", "Sentences accepted and waiting to join the decoding batch", registry=r
        )
        self.in_progress = Gauge(
            p + "requests_in_progress",
            "Translate requests being handled (accepted or not yet), a stream until its last event",
            registry=r,
        )
        self.live_rows = Gauge(
            p + "live_rows", "Hypotheses (beam x sentences) in the decoding batch, after the last step", registry=r
        )
        self.step_rows = Histogram(
            p + "step_rows", "Hypotheses decoded per engine step (mean: sum / count)", buckets=ROW_BUCKETS, registry=r
        )
        self.admitted = Histogram(
            p + "admitted_sentences",
            "Sentences that joined the batch per engine step",
            buckets=ADMITTED_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            p + "step_seconds",
            "Time of one engine step (encoding the arrivals and one decoder step per beam size)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.sentences = Counter(p + "sentences", "Sentences decoded to the end", registry=r)
        self.target_tokens = Counter(
            p + "target_tokens", "Target tokens produced (every n-best hypothesis)", registry=r
        )
        self.decode_seconds = Counter(
            p + "decode_seconds",
            "Time the worker spent stepping the engine "
            "(rate(target_tokens_total) / rate(decode_seconds_total): tokens per "
            "second of decoding)",
            registry=r,
        )
        self.ready = Gauge(p + "ready", "1 once the model is loaded and warmed up", registry=r)
