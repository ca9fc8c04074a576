"""A closed-loop HTTP load generator: ``clients`` threads, each with one keep-alive connection,
send a request, wait for the answer, send the next, until the duration has passed (the request in
flight then is finished and counted). Sentences/s counts the sentences of 200 answers over the time
from the first request sent to the last answer received."""
from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    start: float
    end: float
    status: int
    sentences: int


@dataclass
class LoadResult:
    clients: int
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # transport errors (no HTTP status)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def summary(self) -> dict:
        ok = self.ok
        if not ok:
            return {"clients": self.clients, "requests": len(self.samples), "ok": 0, "failures": len(self.failures)}
        wall = max(s.end for s in ok) - min(s.start for s in self.samples)
        lat = np.array([s.end - s.start for s in ok]) * 1000
        return {
            "clients": self.clients,
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": len(self.samples) - len(ok),
            "failures": len(self.failures),
            "wall_s": round(wall, 3),
            "sentences_per_s": round(sum(s.sentences for s in ok) / wall, 3),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1),
                           "p90": round(float(np.percentile(lat, 90)), 1),
                           "p99": round(float(np.percentile(lat, 99)), 1),
                           "mean": round(float(lat.mean()), 1), "max": round(float(lat.max()), 1)},
        }


def post_json(conn: http.client.HTTPConnection, path: str, payload: dict) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def run_load(url: str, make_request: Callable[[int, int], dict], clients: int, duration_s: float,
             min_requests: int = 1, timeout_s: float = 600.0) -> LoadResult:
    """``make_request(client, k)``: the JSON body of client's k-th request (its "text" a list).
    Every client sends at least ``min_requests``."""
    parts = urllib.parse.urlsplit(url)
    result = LoadResult(clients)
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    deadline: list[float] = []

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
        barrier.wait()
        if c == 0:
            deadline.append(time.perf_counter() + duration_s)
        k = 0
        try:
            while k < min_requests or not deadline or time.perf_counter() < deadline[0]:
                payload = make_request(c, k)
                t0 = time.perf_counter()
                try:
                    status, _ = post_json(conn, "/v1/translate", payload)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        result.failures.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
                    continue
                t1 = time.perf_counter()
                with lock:
                    result.samples.append(Sample(t0, t1, status, len(payload["text"])))
                k += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + timeout_s + 60)
    return result
