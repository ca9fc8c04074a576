"""One measurement in a fresh process: load time, RSS after load, per-case tok/s, peak RSS, ids.
usage: python scripts/measure_load_memory.py ARTIFACT OUT.json [greedy1,beam5x1,greedy32,beam5x32]"""

import json
import sys
import time

import numpy as np


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024


def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


art_path, out_path = sys.argv[1], sys.argv[2]
cases = sys.argv[3].split(",") if len(sys.argv) > 3 else ["greedy1", "beam5x1", "greedy32", "beam5x32"]
t0 = time.perf_counter()  # the imports below are part of the load measured
from deltalm.backends.ort import OrtBackend  # noqa: E402
from deltalm.options import TranslateOptions  # noqa: E402
from deltalm.search import generate  # noqa: E402

t_import = time.perf_counter() - t0
t0 = time.perf_counter()
be = OrtBackend.from_artifact(art_path, threads=2)  # open + sha256 check + sessions
t_load = time.perf_counter() - t0
t_verify = None
rss_load = rss_mb()
hwm_load = hwm_mb()
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak below is the translation's
    f.write("5")
cfg = be.cfg
rng = np.random.default_rng(0)


def batch(n, length=30):
    src = rng.integers(4, cfg.vocab_size, size=(n, length))
    src[:, -1] = cfg.eos
    return src


res = {
    "artifact": art_path,
    "load_s": t_load,
    "verify_s": t_verify,
    "rss_after_load_mb": rss_load,
    "hwm_after_load_mb": hwm_load,
    "cases": {},
}
T = 50
for case in cases:
    beam, n = {"greedy1": (1, 1), "beam5x1": (5, 1), "greedy32": (1, 32), "beam5x32": (5, 32)}[case]
    src = batch(n)
    opts = TranslateOptions(beam=beam, max_len_b=T, min_len=T)
    t = time.perf_counter()
    hyps = generate(be, src, opts)
    dt = time.perf_counter() - t
    res["cases"][case] = {"tok_s": n * T / dt, "s": dt, "ids": [h[0].tokens for h in hyps], "rss_mb": rss_mb()}
res["peak_rss_translating_mb"] = hwm_mb()
res["peak_rss_mb"] = max(hwm_load, res["peak_rss_translating_mb"])
res["peak_translating_over_load"] = res["peak_rss_translating_mb"] / rss_load
json.dump(res, open(out_path, "w"))
print(
    json.dumps({k: v for k, v in res.items() if k != "cases"}),
    {c: round(v["tok_s"], 1) for c, v in res["cases"].items()},
)
