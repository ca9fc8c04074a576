"""``deltalm serve``: the real server as a subprocess (``--port 0``: the kernel picks a free port,
the ready line names it), talked to over real HTTP. Every wait has a timeout; no test asserts a
duration. Servers that hold requests back use a long ``--max-wait-ms`` so that what is queued is
known when the test acts (never a race against the clock)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from cli_support import DELTALM, ENV, run_cli  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

SENTENCES = [
    "Die Katze sieht den roten Apfel.",
    "Der Hund trinkt Wasser.",
    "Ich habe ein kleines Haus.",
    "Wir essen heute Brot.",
    "Das Kind spielt im Garten.",
    "Sie liest ein altes Buch.",
]
OPTION_SETS = {
    "beam5": {"beam": 5, "max_len_b": 10},
    "beam2-nbest2": {"beam": 2, "nbest": 2, "lenpen": 0.5, "max_len_b": 8},
}
WAIT_S = 60  # upper bound of any single wait (a loaded machine is slow, never this slow)


class Server:
    """``deltalm serve ARTIFACT --port 0 ARGS`` until ``stop()``."""

    def __init__(self, artifact, *args: str):
        cmd = [str(DELTALM), "serve", str(artifact), "--port", "0", "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.stderr: list[str] = []
        self._stderr_reader = threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True)
        self._stderr_reader.start()
        self.stdout = lines
        try:
            line = lines.get(timeout=WAIT_S)
        except queue.Empty:
            self.stop()
            raise AssertionError(f"no ready line within {WAIT_S} s: {''.join(self.stderr)}") from None
        assert line.startswith("deltalm serve: ready on http://127.0.0.1:"), (line, self.stderr)
        self.url = line.split()[-1]
        self.port = urllib.parse.urlsplit(self.url).port

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT_S)
        self._stderr_reader.join(timeout=WAIT_S)
        return self.proc.returncode


def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = WAIT_S):
    """(status, headers, parsed JSON or text) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, resp.msg, json.loads(raw) if ctype.startswith("application/json") else raw
    finally:
        conn.close()


def translate(port: int, texts, **options):
    return request(port, "POST", "/v1/translate", {"text": texts, **options})


def metrics(port: int) -> dict:
    """{(name, labels as a sorted tuple): value}, parsed by prometheus_client's parser."""
    status, _, text = request(port, "GET", "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def queued(port: int) -> float:
    return metrics(port)[("deltalm_serve_queue_sentences", ())]


def assert_error(status, body, expected_status: int, kind: str, *fragments: str):
    assert status == expected_status, body
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str)
    for fragment in fragments:
        assert fragment in body["error"]["message"], (fragment, body)


def assert_same_translation(got: dict, want: dict):
    """Same hypotheses (tokens, text) and scores within 1e-4 (batched numerics may differ in the
    last bits)."""
    assert len(got["nbest"]) == len(want["nbest"])
    for g, w in zip(got["nbest"], want["nbest"]):
        assert g["tokens"] == w["tokens"] and g["text"] == w["text"]
        assert abs(g["score"] - w["score"]) <= 1e-4
        assert len(g["positional_scores"]) == len(w["positional_scores"])
        assert all(abs(a - b) <= 1e-4 for a, b in zip(g["positional_scores"], w["positional_scores"]))


@pytest.fixture(scope="module")
def cli_reference(tiny):
    """``deltalm translate --format jsonl`` of SENTENCES, per option set: {name: [record, ...]}."""
    flags = {"beam": "--beam", "nbest": "--nbest", "lenpen": "--lenpen", "max_len_b": "--max-len-b"}
    reference = {}
    for name, options in OPTION_SETS.items():
        argv = ["translate", tiny.artifact, "--format", "jsonl", "--threads", "1"]
        for key, value in options.items():
            argv += [flags[key], str(value)]
        res = run_cli(argv, stdin="".join(s + "\n" for s in SENTENCES).encode())
        assert res.rc == 0, res.err
        reference[name] = [json.loads(line) for line in res.lines]
    return reference


@pytest.fixture(scope="module")
def shortlist_file(tiny, tmp_path_factory):
    """A small shortlist of the tiny model (a parallel corpus of SENTENCES: tokenizing only)."""
    from deltalm import Translator, shortlist_from_corpus

    path = tmp_path_factory.mktemp("shortlist") / "sl.npz"
    with Translator(tiny.artifact, threads=1) as translator:
        shortlist_from_corpus(translator, SENTENCES, SENTENCES[::-1], frequent=8, per_source=4).save(path)
    return path


@pytest.fixture(scope="module")
def server(tiny):
    """Small limits, so that they are cheap to exceed."""
    s = Server(
        tiny.artifact,
        "--max-body-bytes",
        "4096",
        "--max-sentences",
        "8",
        "--max-sentence-tokens",
        "24",
        "--max-batch-tokens",
        "512",
    )
    yield s
    assert s.stop() == 0
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


@pytest.fixture(scope="module")
def held_server(tiny):
    """Request-level batching: sentences wait up to 5 s for a batch (unless 320 rows come); the
    queue holds 4; timeout 2 s."""
    s = Server(
        tiny.artifact,
        "--batching",
        "request",
        "--max-wait-ms",
        "5000",
        "--max-batch-rows",
        "320",
        "--max-queue-sentences",
        "4",
        "--timeout-s",
        "2",
    )
    yield s
    assert s.stop() == 0
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


# --- outputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batching", ["inflight", "request"])
def test_concurrent_clients_share_steps_and_get_the_cli_outputs(tiny, cli_reference, batching):
    # 8 clients at once, 2 option sets (two beam sizes decoding side by side), 3 sentences each
    s = Server(tiny.artifact, "--batching", batching)
    try:
        jobs = []
        for client in range(8):
            name = list(OPTION_SETS)[client % 2]
            picks = [(client + k) % len(SENTENCES) for k in range(3)]
            jobs.append((name, picks))
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(
                pool.map(lambda job: translate(s.port, [SENTENCES[i] for i in job[1]], **OPTION_SETS[job[0]]), jobs)
            )
        for (name, picks), (status, _, body) in zip(jobs, answers):
            assert status == 200, body
            assert [r["id"] for r in body["results"]] == [0, 1, 2]
            for result, i in zip(body["results"], picks):
                assert_same_translation(result, cli_reference[name][i])
        m = metrics(s.port)
        assert m[("deltalm_serve_sentences_total", ())] == 24 + 1  # and the warm-up sentence
        assert m[("deltalm_serve_admitted_sentences_sum", ())] == 24 + 1
        assert m[("deltalm_serve_step_rows_count", ())] == m[("deltalm_serve_step_seconds_count", ())] > 0
        assert m[("deltalm_serve_live_rows", ())] == 0
    finally:
        assert s.stop() == 0


def test_result_records_have_the_shape_of_translate_jsonl(server, cli_reference):
    status, _, body = translate(server.port, [SENTENCES[1], "", SENTENCES[0]], **OPTION_SETS["beam2-nbest2"])
    assert status == 200
    assert [r["id"] for r in body["results"]] == [0, 1, 2]
    assert body["results"][1]["nbest"] == []  # a blank sentence, as a blank line in the CLI
    for result, i in zip([body["results"][0], body["results"][2]], [1, 0]):
        assert set(result) == {"id", "nbest"} and len(result["nbest"]) == 2
        assert all(set(h) == {"tokens", "score", "positional_scores", "text"} for h in result["nbest"])
        assert_same_translation(result, cli_reference["beam2-nbest2"][i])


def test_sampling_with_a_seed_draws_per_sentence_as_the_library_does(server, translator):
    options = {"sampling": True, "beam": 3, "nbest": 3, "seed": 7, "sampling_topk": 5, "max_len_b": 6}
    status, _, body = translate(server.port, SENTENCES[:2], **options)
    assert status == 200
    assert [len(r["nbest"]) for r in body["results"]] == [3, 3]
    # each sentence draws from a generator seeded by (seed, its position in the request), whatever
    # else decodes: the library's results for the same request
    for got, want in zip(body["results"], translator.translate_batch(SENTENCES[:2], **options)):
        assert_same_translation(got, want.to_dict())


def test_health_ready_and_openapi(server):
    assert request(server.port, "GET", "/health")[:3:2] == (200, {"status": "ok"})
    assert request(server.port, "GET", "/ready")[:3:2] == (200, {"status": "ready"})
    status, _, spec = request(server.port, "GET", "/openapi.json")
    assert status == 200
    schema = spec["paths"]["/v1/translate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    import dataclasses

    from deltalm import TranslateOptions

    assert set(schema["properties"]) == {"text", "stream", "target_prefix", "constraints"} | {
        f.name for f in dataclasses.fields(TranslateOptions)
    }
    assert "sampling_topk" in schema["properties"] and "topk" not in schema["properties"]
    score = spec["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(score["properties"]) == {"source", "target", "src_prefix", "tgt_prefix", "truncate"}


def test_a_server_with_a_shortlist_answers_as_translate_with_it_and_health_names_it(
    tiny, shortlist_file, cli_reference
):
    # one request of every sentence, one backend batch: the batch `deltalm translate` makes of the
    # same lines (with a shortlist a batch scores the candidates of all its sentences)
    res = run_cli(
        [
            "translate",
            tiny.artifact,
            "--format",
            "jsonl",
            "--threads",
            "1",
            "--beam",
            "5",
            "--max-len-b",
            "10",
            "--shortlist",
            shortlist_file,
        ],
        stdin="".join(s + "\n" for s in SENTENCES).encode(),
    )
    assert res.rc == 0, res.err
    want = [json.loads(line) for line in res.lines]
    # the shortlist changes some translation (else this test could not tell it is used)
    assert [r["nbest"][0]["tokens"] for r in want] != [r["nbest"][0]["tokens"] for r in cli_reference["beam5"]]
    s = Server(tiny.artifact, "--shortlist", str(shortlist_file))
    try:
        status, _, body = translate(s.port, SENTENCES, **OPTION_SETS["beam5"])
        assert status == 200, body
        assert [r["id"] for r in body["results"]] == list(range(len(SENTENCES)))
        for got, expected in zip(body["results"], want, strict=True):
            assert_same_translation(got, expected)
        status, _, health = request(s.port, "GET", "/health")
        assert status == 200
        assert health == {
            "status": "ok",
            "shortlist": {
                "file": "sl.npz",
                "sha256": hashlib.sha256(shortlist_file.read_bytes()).hexdigest(),
                "built_from": "a parallel corpus",
            },
        }
    finally:
        assert s.stop() == 0
    assert "Traceback" not in "".join(s.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_bad_shortlist_fails_in_one_line_before_the_port_is_bound(tiny, tmp_path):
    from deltalm import build_shortlist

    (tmp_path / "text.npz").write_text("not a shortlist\n")
    build_shortlist([([5], [6])], 7).save(tmp_path / "small.npz")
    for name, fragment in (("text.npz", "not a shortlist file"), ("small.npz", "vocabulary of 7")):
        done = subprocess.run(
            [
                str(DELTALM),
                "serve",
                str(tiny.artifact),
                "--port",
                str(free_port()),
                "--threads",
                "1",
                "--shortlist",
                str(tmp_path / name),
            ],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=WAIT_S,
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""  # no ready line: the service never listened
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("deltalm: error: ") and fragment in lines[0], done.stderr


def test_a_busy_port_is_one_line_naming_it_and_how_to_pick_another(tiny):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    try:
        # the artifact does not exist: the port is checked first, before anything is loaded
        for model in (tiny.artifact, tiny.artifact.parent / "no-such-artifact"):
            done = subprocess.run(
                [str(DELTALM), "serve", str(model), "--port", str(port), "--threads", "1"],
                capture_output=True,
                text=True,
                env=ENV,
                timeout=WAIT_S,
            )
            assert done.returncode == 2, done.stderr
            assert done.stdout == ""
            lines = done.stderr.splitlines()
            assert len(lines) == 1, done.stderr
            assert lines[0] == (
                f"deltalm: error: port {port} on 127.0.0.1 is already in use (another server is "
                f"listening there): pick another with --port N (e.g. --port {port + 1}), or --port 0 "
                "for any free port"
            )
    finally:
        held.close()


def test_a_truncated_sentence_is_logged_without_a_line_number(tiny):
    s = Server(tiny.artifact, "--max-wait-ms", "0")
    try:
        status, _, body = translate(s.port, ["kurz", " ".join(["Katze"] * 600)], truncate=True, max_len_b=2)
        assert status == 200 and len(body["results"]) == 2, body
    finally:
        assert s.stop() == 0
    warnings = [line for line in s.stderr if "warning" in line]
    assert len(warnings) == 1, s.stderr
    assert re.fullmatch(
        r"deltalm serve: warning: a sentence of a request: \d+ source tokens, truncated to the "
        r"model's 512\n",
        warnings[0],
    ), warnings


# --- errors ------------------------------------------------------------------------------------


def test_malformed_json_is_400(server):
    status, _, body = request(server.port, "POST", "/v1/translate", b'{"text": ["a"')
    assert_error(status, body, 400, "malformed_json", "not JSON")


def test_body_over_the_limit_is_413(server):
    status, _, body = translate(server.port, ["x" * 5000])
    assert_error(status, body, 413, "body_too_large", "limit is 4096")


def test_too_many_sentences_is_413(server):
    status, _, body = translate(server.port, ["a"] * 9)
    assert_error(status, body, 413, "too_many_sentences", "9 sentences", "limit is 8")


def test_sentence_over_the_token_limit_is_422_naming_it(server):
    status, _, body = translate(server.port, ["kurz", " ".join(["Katze"] * 40)])
    assert_error(status, body, 422, "sentence_too_long", "sentence 1 has", "limit is 24")
    assert body["error"]["sentence"] == 1


@pytest.mark.parametrize(
    "options, option, fragment",
    [
        ({"beam": 0}, "beam", "must be >= 1"),
        ({"beam": "5"}, "beam", "must be an integer"),
        ({"lenpen": True}, "lenpen", "must be a number"),
        ({"topk": 5}, "topk", "is not an option"),
        ({"sampling_topk": 5}, "sampling_topk", "applies only with sampling"),
        ({"nbest": 3, "beam": 2}, "nbest", "between 1 and beam"),
        ({"beam": 100000}, "beam", "smaller than the vocabulary"),  # known only to the model
        ({"tgt_prefix": ["<no-such-symbol>"]}, "tgt_prefix", "<no-such-symbol>"),
    ],
)
def test_bad_options_are_422_naming_the_option(server, options, option, fragment):
    status, _, body = translate(server.port, ["Hallo"], **options)
    assert_error(status, body, 422, "invalid_option", fragment)
    assert body["error"]["option"] == option


@pytest.mark.parametrize("payload", [["a"], {"txt": ["a"]}, {"text": "a"}, {"text": [1]}])
def test_a_body_that_is_not_a_translate_request_is_422(server, payload):
    status, _, body = request(server.port, "POST", "/v1/translate", payload)
    assert_error(status, body, 422, "invalid_request", "text")


def test_unknown_path_and_method_have_the_same_error_shape(server):
    status, _, body = request(server.port, "GET", "/v2/nothing")
    assert_error(status, body, 404, "not_found")
    status, _, body = request(server.port, "GET", "/v1/translate")
    assert_error(status, body, 405, "method_not_allowed")


def test_metrics_parse_as_prometheus_text_and_count_errors(server):
    before = metrics(server.port)
    request(server.port, "POST", "/v1/translate", b"not json")
    assert translate(server.port, [SENTENCES[2]], beam=1, max_len_b=4)[0] == 200
    after = metrics(server.port)
    for name in (
        "deltalm_serve_request_seconds_bucket",
        "deltalm_serve_step_rows_bucket",
        "deltalm_serve_step_seconds_bucket",
        "deltalm_serve_admitted_sentences_bucket",
        "deltalm_serve_live_rows",
        "deltalm_serve_queue_sentences",
        "deltalm_serve_ready",
    ):
        assert any(key[0] == name for key in after), name
    assert (
        after[("deltalm_serve_errors_total", (("kind", "malformed_json"),))]
        == before[("deltalm_serve_errors_total", (("kind", "malformed_json"),))] + 1
    )
    assert (
        after[("deltalm_serve_requests_total", (("code", "200"),))]
        == before.get(("deltalm_serve_requests_total", (("code", "200"),)), 0) + 1
    )
    assert after[("deltalm_serve_request_seconds_count", ())] == before[("deltalm_serve_request_seconds_count", ())] + 2
    assert after[("deltalm_serve_sentences_total", ())] == before[("deltalm_serve_sentences_total", ())] + 1
    assert after[("deltalm_serve_target_tokens_total", ())] > before[("deltalm_serve_target_tokens_total", ())]
    assert after[("deltalm_serve_ready", ())] == 1


# --- protection ----------------------------------------------------------------------------------


def test_full_queue_is_503_with_retry_after(held_server):
    port = held_server.port
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(translate, port, SENTENCES[:3], beam=1, max_len_b=4)
        wait_for(lambda: queued(port) == 3, "3 queued sentences")
        status, headers, body = translate(port, SENTENCES[3:5], beam=1, max_len_b=4)
        assert_error(status, body, 503, "queue_full", "limit 4")
        assert int(headers["Retry-After"]) >= 1
        assert first.result(timeout=WAIT_S)[0] == 504  # held for 5 s, the timeout is 2 s


def test_timeout_is_504_and_frees_the_queue(held_server):
    port = held_server.port
    status, _, body = translate(port, SENTENCES[:2], beam=1, max_len_b=4)
    assert_error(status, body, 504, "timeout", "2 s")
    wait_for(lambda: queued(port) == 0, "the queue to empty")
    # the room is there again
    with ThreadPoolExecutor(1) as pool:
        again = pool.submit(translate, port, SENTENCES[:4], beam=1, max_len_b=4)
        wait_for(lambda: queued(port) == 4, "4 queued sentences")
        assert again.result(timeout=WAIT_S)[0] == 504


def test_a_client_that_disconnects_leaves_the_queue(held_server):
    port = held_server.port
    before = metrics(port)[("deltalm_serve_errors_total", (("kind", "client_disconnected"),))]
    body = json.dumps({"text": SENTENCES[:2], "beam": 1}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    sock.sendall(
        b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    wait_for(lambda: queued(port) == 2, "2 queued sentences")
    sock.close()
    wait_for(lambda: queued(port) == 0, "the queue to empty")
    m = metrics(port)
    assert m[("deltalm_serve_errors_total", (("kind", "client_disconnected"),))] == before + 1


def test_binds_localhost_by_default(server):
    other = [a for a in _own_addresses() if not a.startswith("127.")]
    if not other:
        pytest.skip("no address besides loopback")
    with pytest.raises(OSError):  # not reachable on the machine's other addresses
        socket.create_connection((other[0], server.port), timeout=5).close()


def _own_addresses() -> list[str]:
    """This machine's IPv4 addresses: the hostname's, and the one a datagram socket would leave from."""
    found = set()
    try:
        found |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except OSError:
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: this only picks a route
        found.add(probe.getsockname()[0])
    except OSError:
        pass
    finally:
        probe.close()
    return sorted(found)


def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(tiny, cli_reference):
    s = Server(tiny.artifact, "--batching", "request", "--max-wait-ms", "20000", "--max-batch-rows", "320")
    try:
        jobs = [[k % len(SENTENCES), (k + 1) % len(SENTENCES)] for k in range(6)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [
                pool.submit(translate, s.port, [SENTENCES[i] for i in job], **OPTION_SETS["beam5"]) for job in jobs
            ]
            wait_for(lambda: queued(s.port) == 12, "12 queued sentences")
            s.proc.send_signal(signal.SIGTERM)
            for job, future in zip(jobs, futures):
                status, _, body = future.result(timeout=WAIT_S)
                assert status == 200, body
                for result, i in zip(body["results"], job):
                    assert_same_translation(result, cli_reference["beam5"][i])
        assert s.proc.wait(timeout=WAIT_S) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
    finally:
        s.stop()
    assert "Traceback" not in "".join(s.stderr)


# --- in-flight batching ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def translator(tiny):
    """The tests' reference: the library, each sentence decoded alone."""
    from deltalm import Translator

    with Translator(tiny.artifact, threads=1) as t:
        yield t


def alone(translator, text: str, **options) -> dict:
    return translator.translate_batch([text], **options)[0].to_dict()


def live_rows(port: int) -> float:
    return metrics(port)[("deltalm_serve_live_rows", ())]


def test_a_short_request_is_answered_long_before_a_long_batch_ends(tiny, translator):
    # forced lengths: the long sentences take 500 steps (of 6 x 8 rows: seconds even on an idle
    # machine), the short one 4
    long_opts, short_opts = {"beam": 8, "min_len": 500, "max_len_b": 500}, {"beam": 5, "min_len": 3, "max_len_b": 3}
    s = Server(tiny.artifact)
    try:
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(lambda: (translate(s.port, SENTENCES[:6], **long_opts), time.monotonic()))
            wait_for(lambda: live_rows(s.port) == 48, "the long batch to decode")
            sent = time.monotonic()
            status, _, short = translate(s.port, [SENTENCES[4]], **short_opts)
            short_done = time.monotonic()
            (long_status, _, long_body), long_done = long.result(timeout=WAIT_S)
        assert status == 200 and long_status == 200
        assert short_done - sent <= 0.25 * (long_done - sent), (short_done - sent, long_done - sent)
        assert_same_translation(short["results"][0], alone(translator, SENTENCES[4], **short_opts))
        for k in range(6):
            assert_same_translation(long_body["results"][k], alone(translator, SENTENCES[k], **long_opts))
    finally:
        assert s.stop() == 0


def sse_events(resp, stop_after: int | None = None) -> list:
    """The data of each server-sent event of a response (JSON decoded, "[DONE]" as is)."""
    events, data = [], []
    while stop_after is None or len(events) < stop_after:
        line = resp.readline()
        if not line:
            break
        line = line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            text = "\n".join(data)
            events.append(text if text == "[DONE]" else json.loads(text))
            data = []
    return events


def stream(port: int, texts, **options):
    """(status, content type, events) of a streamed translate request over a real socket."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request(
            "POST",
            "/v1/translate",
            body=json.dumps({"text": texts, "stream": True, **options}),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.getheader("Content-Type"), json.loads(resp.read())
        return resp.status, resp.getheader("Content-Type"), sse_events(resp)
    finally:
        conn.close()


def test_sentences_at_random_moments_with_mixed_lengths_equal_translate_alone(tiny, translator):
    import random

    rng = random.Random(25)
    calls = []
    for k in range(12):
        max_len_b = rng.choice([3, 6, 12, 30])
        options = {"beam": rng.choice([1, 2, 4]), "max_len_b": max_len_b, "min_len": rng.randint(0, max_len_b)}
        calls.append((SENTENCES[k % len(SENTENCES)], options, rng.uniform(0, 0.5), k % 2 == 1))
    s = Server(tiny.artifact)

    def call(job):
        text, options, delay, streamed = job
        time.sleep(delay)
        if streamed:
            status, ctype, events = stream(s.port, [text], **options)
            assert status == 200 and ctype.startswith("text/event-stream"), events
            assert events[-1] == "[DONE]" and not events[-2].get("partial"), events
            return events[-2]
        status, _, body = translate(s.port, [text], **options)
        assert status == 200, body
        return body["results"][0]

    try:
        with ThreadPoolExecutor(len(calls)) as pool:
            got = list(pool.map(call, calls))
    finally:
        assert s.stop() == 0
    for (text, options, _, _), result in zip(calls, got):
        assert_same_translation(result, alone(translator, text, **options))
        # the library's stream gives the same final record
        [final] = [e for e in translator.translate_stream([text], **options) if not hasattr(e, "tokens")]
        assert_same_translation(result, final.to_dict())


def test_a_stream_sends_partials_then_each_final_record_then_done(server, translator):
    options = {"beam": 3, "nbest": 2, "min_len": 300, "max_len_b": 300}  # long enough to be read while decoding
    status, ctype, events = stream(server.port, [SENTENCES[0], "", SENTENCES[1]], **options)
    assert status == 200 and ctype.startswith("text/event-stream")
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    finals = {e["id"]: e for e in events[:-1] if not e.get("partial")}
    assert sorted(finals) == [0, 1, 2] and len(finals) == len(events) - 1 - sum(
        bool(e.get("partial")) for e in events[:-1]
    )
    _, _, plain = translate(server.port, [SENTENCES[0], "", SENTENCES[1]], **options)
    for k in range(3):
        assert finals[k] == plain["results"][k] or k != 1  # the blank one: exactly the plain record
        assert_same_translation(finals[k], plain["results"][k])
    for k in (0, 2):
        mine = [e for e in events[:-1] if e["id"] == k]
        assert mine[-1] is finals[k]  # nothing of a sentence after its final record
        partials = mine[:-1]
        assert 1 <= len(partials) <= 301  # at most one a step
        for p in partials:
            assert set(p) == {"id", "partial", "tokens", "text"} and p["partial"] is True
            assert p["text"] == translator.tokenizer.decode(p["tokens"])
        assert [len(p["tokens"]) for p in partials] == sorted({len(p["tokens"]) for p in partials})  # grows


def test_a_stream_error_after_it_began_is_an_event(held_server):
    # held for 5 s, the timeout is 2 s: the stream has begun (the blank sentence's record) when it times out
    status, ctype, events = stream(held_server.port, ["", SENTENCES[0]], beam=1, max_len_b=4)
    assert status == 200 and ctype.startswith("text/event-stream")
    assert events[0] == {"id": 0, "nbest": []}
    assert events[1]["error"]["type"] == "timeout" and "2 s" in events[1]["error"]["message"]
    assert events[2:] == ["[DONE]"]
    wait_for(lambda: queued(held_server.port) == 0, "the queue to empty")


def test_errors_before_a_stream_begins_are_http_statuses(server):
    status, ctype, body = stream(server.port, ["Hallo"], beam=0)
    assert_error(status, body, 422, "invalid_option", "beam")
    status, _, body = translate(server.port, ["Hallo"], stream="yes")
    assert_error(status, body, 422, "invalid_option", "stream")


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_disconnects_takes_its_decoding_sentences_out_of_the_batch(tiny, streamed):
    s = Server(tiny.artifact)
    try:
        before = metrics(s.port)
        # 6 sentences x 8 rows x 500 steps: seconds even on an idle machine
        body = json.dumps({"text": SENTENCES, "beam": 8, "min_len": 500, "max_len_b": 500, "stream": streamed}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S)
        sock.sendall(
            b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if streamed:
            received = b""
            while b"data: " not in received:  # a partial record: it is decoding
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
        else:
            wait_for(lambda: live_rows(s.port) == 48, "the sentences to decode")
        sock.close()
        wait_for(lambda: live_rows(s.port) == 0, "the sentences to leave the batch")
        after = metrics(s.port)
        # they left unfinished (a finished sentence counts in sentences_total)
        assert after[("deltalm_serve_sentences_total", ())] == before[("deltalm_serve_sentences_total", ())]
        wait_for(
            lambda: (
                metrics(s.port)[("deltalm_serve_errors_total", (("kind", "client_disconnected"),))]
                == before[("deltalm_serve_errors_total", (("kind", "client_disconnected"),))] + 1
            ),
            "the 499 counted",
        )
    finally:
        assert s.stop() == 0


def test_target_prefix_per_sentence(server, translator):
    texts = [SENTENCES[0], SENTENCES[1]]
    status, _, body = translate(server.port, texts, beam=2, max_len_b=8, target_prefix=["der Hund", None])
    assert status == 200, body
    want = translator.translate_batch(texts, beam=2, max_len_b=8, target_prefix=["der Hund", None])
    for got, expected in zip(body["results"], want):
        assert_same_translation(got, expected.to_dict())
    prefix = translator.tokenizer.encode("der Hund", [])[:-1]
    assert body["results"][0]["nbest"][0]["tokens"][: len(prefix)] == prefix


@pytest.mark.parametrize(
    "value, fragment",
    [
        (["a"], "one entry per sentence of text (2), got 1 entries"),
        ("a", "got a str"),
        (["a", 3], "target_prefix[1] must be a target prefix text or null"),
    ],
)
def test_a_bad_target_prefix_is_422(server, value, fragment):
    status, _, body = translate(server.port, ["Hallo", "Welt"], target_prefix=value)
    assert_error(status, body, 422, "invalid_option", fragment)
    assert body["error"]["option"] == "target_prefix"


def test_the_page_and_the_docs_need_nothing_from_outside(server):
    status, _, page = request(server.port, "GET", "/")
    assert status == 200 and "<textarea" in page
    for path in ("/docs", "/redoc"):
        status, _, html = request(server.port, "GET", path)
        assert status == 200
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert urls and all(u.startswith("/") for u in urls), urls  # no CDN
        for url in urls:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
            try:
                conn.request("GET", url)
                resp = conn.getresponse()
                assert resp.status == 200 and len(resp.read()) > 0, url
            finally:
                conn.close()


def test_sigterm_under_64_clients_with_cut_streams_answers_every_request_made_before_it(tiny):
    """64 clients, each a new connection per request (a third streamed, half of those cut after
    their first event), and 32 connections waiting in the accept queue; SIGTERM while they run. A
    request whose connection was made before the signal gets an HTTP answer (200 or 503), never a
    reset; the process exits 0."""
    import random

    s = Server(tiny.artifact)
    stop = threading.Event()
    lock = threading.Lock()
    outcomes = []  # (connected at, what: status / "cut" / exception name, streamed)

    def client(c: int) -> None:
        rng = random.Random(c)
        for k in range(200):  # bounded; normally ended by the shutdown
            if stop.is_set():
                return
            streamed, cut = rng.random() < 1 / 3, rng.random() < 0.5
            body = json.dumps(
                {
                    "text": [SENTENCES[(c + k) % len(SENTENCES)]],
                    "beam": 2,
                    "max_len_b": rng.randint(3, 12),
                    "stream": streamed,
                }
            ).encode()
            connected = None
            try:
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=WAIT_S)
                conn.connect()
                connected = time.monotonic()
                conn.request("POST", "/v1/translate", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                if streamed and cut and resp.status == 200:
                    sse_events(resp, stop_after=1)
                    what = "cut"
                elif streamed and resp.status == 200:
                    events = sse_events(resp)
                    assert events[-1] == "[DONE]" and "nbest" in events[-2], events
                    what = 200
                else:
                    answer = json.loads(resp.read())
                    assert ("results" in answer) == (resp.status == 200), answer
                    what = resp.status
                conn.close()
            except (OSError, http.client.HTTPException) as e:
                what = type(e).__name__
            with lock:
                outcomes.append((connected, what, streamed))
            if what not in (200, "cut"):
                return  # 503 shutting_down, or the server is gone

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(64)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: sum(o[1] in (200, "cut") for o in outcomes) >= 64, "64 answers before the signal")
        # and a burst the server has not accepted yet: made while it is stopped, so that at the
        # signal they wait in the kernel's accept queue with their requests sent
        os.kill(s.proc.pid, signal.SIGSTOP)
        try:
            burst = [socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) for _ in range(32)]
            body = json.dumps({"text": [SENTENCES[0]], "beam": 1, "max_len_b": 3}).encode()
            for sock in burst:
                sock.sendall(
                    b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
            signalled = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
        finally:
            os.kill(s.proc.pid, signal.SIGCONT)
        for sock in burst:
            received = b""
            try:
                while b"\r\n" not in received:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    received += chunk
            except OSError as e:
                received = repr(e).encode()
            finally:
                sock.close()
            assert received.startswith((b"HTTP/1.1 200", b"HTTP/1.1 503")), received
        assert s.proc.wait(timeout=WAIT_S) == 0
        for t in threads:
            t.join(timeout=WAIT_S)
        assert not any(t.is_alive() for t in threads)
    finally:
        stop.set()
        s.stop()
    before = [o for o in outcomes if o[0] is not None and o[0] < signalled]
    assert all(what in (200, 503, "cut") for _, what, _ in before), [o for o in before if o[1] not in (200, 503, "cut")]
    assert any(what == 503 for _, what, _ in outcomes)  # the signal came while clients were sending
    assert "Traceback" not in "".join(s.stderr), "".join(s.stderr)


# --- decoding control over HTTP ----------------------------------------------------------------------


def test_score_answers_the_records_of_deltalm_score_and_batches_concurrent_requests(server, tiny, tmp_path):
    sources = ["Die Katze sieht den roten Apfel.", "Hallo"]
    targets = ["Die Katze sieht den roten Apfel.", "Hallo Welt"]
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("".join(s + "\n" for s in sources), encoding="utf-8")
    tgt.write_text("".join(t + "\n" for t in targets), encoding="utf-8")
    res = run_cli(["score", tiny.artifact, "--source", src, "--target", tgt, "--format", "jsonl", "--threads", "1"])
    want = [json.loads(line) for line in res.lines]
    with ThreadPoolExecutor(6) as pool:  # at once: the worker scores the waiting requests' pairs together
        answers = list(
            pool.map(
                lambda _: request(server.port, "POST", "/v1/score", {"source": sources, "target": targets}), range(6)
            )
        )
    for status, _, body in answers:
        assert status == 200, body
        for got, w in zip(body["results"], want):
            assert got["id"] == w["id"] and got["tokens"] == w["tokens"]
            assert abs(got["score"] - w["score"]) <= 1e-4
            assert all(abs(a - b) <= 1e-4 for a, b in zip(got["positional_scores"], w["positional_scores"]))


@pytest.mark.parametrize(
    "body, status, kind, fragment",
    [
        (
            {"source": ["a", "b"], "target": ["x"]},
            422,
            "invalid_request",
            '"source" has 2 sentences but "target" has 1',
        ),
        ({"source": ["a"], "target": [" "]}, 422, "invalid_sentence", "pair 0 has an empty target"),
        (
            {"source": ["a"], "target": ["x"], "beam": 4},
            422,
            "invalid_option",
            "beam is not an option of a score request",
        ),
        ({"text": ["a"]}, 422, "invalid_request", '{"source": [...], "target": [...]}'),
    ],
)
def test_bad_score_requests_are_refused_with_the_reason(server, body, status, kind, fragment):
    got_status, _, got = request(server.port, "POST", "/v1/score", body)
    assert_error(got_status, got, status, kind, fragment)


def test_constraints_per_sentence_are_in_every_hypothesis_and_bad_ones_refused(server):
    status, _, body = translate(
        server.port,
        ["Ein Kind will frisches Brot.", "Hallo"],
        beam=3,
        nbest=2,
        constraints=[["Brot", "Kind"], None],
        constraint_order="unordered",
    )
    assert status == 200, body
    for h in body["results"][0]["nbest"]:
        assert "Brot" in h["text"] and "Kind" in h["text"]
    status, _, body = translate(server.port, ["a", "b"], constraints=[["x"]])
    assert_error(status, body, 422, "invalid_option", "constraints must be a list with one entry per sentence")
    status, _, body = translate(server.port, ["a"], constraints=[["猫"]])
    assert_error(status, body, 422, "invalid_sentence", "sentence 0: the constraint '猫' has pieces the dictionary")
    status, _, body = translate(server.port, ["a"], constraints=[["x"]], sampling=True, beam=2)
    assert_error(status, body, 422, "invalid_sentence", "sampling cannot be combined with lexical constraints")
