"""A closed-loop HTTP load generator: ``clients`` threads, each with one keep-alive connection,
send a request, wait for the answer (and a think time, if any), send the next, until the duration
has passed (the request in flight then is finished and counted). Throughput counts the sentences
and target tokens of 200 answers over the time from the first request sent to the last answer
received; latency is per request kind (``Call.kind``: e.g. short / long)."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Call:
    """One request of a client: its JSON body, its kind (for per-kind latency), and how long
    the client waits before sending it (staggered arrivals)."""

    body: dict
    kind: str = "all"
    delay_s: float = 0.0


@dataclass
class Sample:
    start: float
    end: float
    status: int
    sentences: int
    tokens: int  # target tokens of the best hypotheses (200 answers)
    kind: str


@dataclass
class LoadResult:
    clients: int
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # transport errors (no HTTP status)

    walls: list[float] = field(default_factory=list)  # of the runs added (add)

    def add(self, other: LoadResult) -> None:
        """Count the samples of another run of the same clients as part of this one (its time
        added to this one's)."""
        self.samples += other.samples
        self.failures += other.failures
        self.walls += other.walls or [other.wall()]

    def wall(self) -> float:
        """From the first request sent to the last answer received (summed over added runs)."""
        if self.walls:
            return sum(self.walls)
        ok = self.ok
        return max(s.end for s in ok) - min(s.start for s in self.samples) if ok else 0.0

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    def summary(self) -> dict:
        ok = self.ok
        if not ok:
            return {"clients": self.clients, "requests": len(self.samples), "ok": 0, "failures": len(self.failures)}
        wall = self.wall()
        out = {
            "clients": self.clients,
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": len(self.samples) - len(ok),
            "failures": len(self.failures),
            "wall_s": round(wall, 3),
            "sentences_per_s": round(sum(s.sentences for s in ok) / wall, 3),
            "tokens_per_s": round(sum(s.tokens for s in ok) / wall, 2),
            "latency_ms": _latency(ok),
        }
        kinds = sorted({s.kind for s in ok})
        if kinds != ["all"]:
            out["by_kind"] = {
                kind: {
                    "requests": sum(s.kind == kind for s in ok),
                    "latency_ms": _latency([s for s in ok if s.kind == kind]),
                }
                for kind in kinds
            }
        return out


def _latency(samples: list[Sample]) -> dict:
    lat = np.array([s.end - s.start for s in samples]) * 1000
    return {
        "p50": round(float(np.percentile(lat, 50)), 1),
        "p90": round(float(np.percentile(lat, 90)), 1),
        "p99": round(float(np.percentile(lat, 99)), 1),
        "mean": round(float(lat.mean()), 1),
        "max": round(float(lat.max()), 1),
    }


def post_json(conn: http.client.HTTPConnection, path: str, payload: dict) -> tuple[int, dict]:
    body = json.dumps(payload).encode()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def run_load(
    url: str,
    make_call: Callable[[int, int], Call],
    clients: int,
    duration_s: float,
    min_requests: int = 1,
    timeout_s: float = 1800.0,
) -> LoadResult:
    """``make_call(client, k)``: the client's k-th request (its body's "text" a list). Every client
    sends at least ``min_requests``."""
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
                call = make_call(c, k)
                if call.delay_s > 0:
                    time.sleep(call.delay_s)
                t0 = time.perf_counter()
                try:
                    status, answer = post_json(conn, "/v1/translate", call.body)
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        result.failures.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
                    continue
                t1 = time.perf_counter()
                tokens = sum(len(r["nbest"][0]["tokens"]) for r in answer.get("results", []) if r["nbest"])
                with lock:
                    result.samples.append(Sample(t0, t1, status, len(call.body["text"]), tokens, call.kind))
                k += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + timeout_s + 60)
    return result
