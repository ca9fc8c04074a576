"""Decoding control in ``deltalm bench``: what a per-sentence target prefix and lexical constraints
cost next to plain beam search, what teacher-forced scoring costs next to translation (and next
to the per-token teacher forcing it replaced), and, on the demo model, how many constraints reach
the output.

The speed section runs in one child per ort backend, the variants of one batch interleaved
repetition by repetition so that a change of the machine's load touches them alike:

- plain: beam search of ``batch`` random sources, forced to n tokens + ``</s>`` (as every cell);
- prefix: the same, each sentence with its own forced target prefix of ``prefix_len`` random ids;
- constraints (ordered / unordered): each sentence with ``constraints`` random constraints of
  ``constraint_len`` ids. Forced lengths stay compatible: ``min_len`` only bans ``</s>`` before
  step n, constrained hypotheses may not end before their constraints are met, and at step n only
  ``</s>`` is allowed, so every variant emits the same n + 1 tokens per sentence (tok/s counts
  the tokens actually emitted all the same, the forced prefix included: each costs a step);
- scoring: ``deltalm.scoring.score_pairs`` of the plain variant's best hypotheses (one
  teacher-forced run of the step graph over the whole targets), and the alternative it replaced,
  one step per target token over the self-attention cache (``score_per_step``, here only), on the
  same pairs; their scores must agree.

Random sources and random ids: deterministic from the seed.
"""

from __future__ import annotations

import time

import numpy as np

from .progress import log

VARIANTS = ("plain", "prefix", "ordered", "unordered")


def occurs(seq, sub) -> bool:
    """Whether ``sub`` is a contiguous part of ``seq``."""
    seq, sub, n = list(seq), list(sub), len(sub)
    return n > 0 and any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def control_sentences(
    sources: np.ndarray,
    pad: int,
    vocab_size: int,
    options,
    variant: str,
    prefix_len: int,
    constraints: int,
    constraint_len: int,
    seed: int,
) -> list:
    """The ``deltalm.search.Sentence`` of every source row (left-padded [batch, width]) for
    ``variant`` (one of VARIANTS): random prefix / constraint ids in [4, vocab) drawn from
    ``seed`` (the same ids for both constraint orders)."""
    from dataclasses import replace

    from deltalm.search import Sentence

    rng = np.random.default_rng(seed)
    prefixes = rng.integers(4, vocab_size, size=(len(sources), prefix_len))
    wanted = rng.integers(4, vocab_size, size=(len(sources), constraints, constraint_len))
    opts = replace(options, constraint_order=variant) if variant in ("ordered", "unordered") else options
    out = []
    for r, row in enumerate(sources):
        src = tuple(int(t) for t in row if t != pad)
        prefix = tuple(int(t) for t in prefixes[r]) if variant == "prefix" else ()
        cons = tuple(tuple(int(t) for t in c) for c in wanted[r]) if variant in ("ordered", "unordered") else ()
        out.append(Sentence(src, opts, prefix, None, cons))
    return out


def decode_sentences(backend, sentences: list) -> list:
    """Every sentence through one ``Engine``; per sentence its n-best hypotheses."""
    from deltalm.search import Engine, Finished

    engine = Engine(backend)
    for i, s in enumerate(sentences):
        engine.add(i, s)
    results: list = [[] for _ in sentences]
    for event in engine.run():
        if isinstance(event, Finished):
            results[event.key] = event.hypotheses
    return results


def score_per_step(backend, sources, targets) -> list[list[float]]:
    """Teacher forcing one token at a time: the encoder, then one step graph run per target
    position (``new_len`` 1) over the self-attention cache (``deltalm.batch.DecoderBatch``, as the
    search keeps it), each run scoring the next target token. What ``score_pairs`` replaced; kept
    here to measure it on the same pairs."""
    from deltalm.batch import DecoderBatch
    from deltalm.search import StepRules
    from deltalm.tokenizer import collate

    cfg = backend.cfg
    rows, width = len(targets), max(len(t) for t in targets)
    encoded = backend.encode(collate(sources, cfg.pad))
    target = np.full((rows, width), cfg.eos, dtype=np.int64)
    for r, t in enumerate(targets):
        target[r, : len(t)] = t
    prev = np.concatenate([np.full((rows, 1), cfg.eos, dtype=np.int64), target[:, :-1]], axis=1)
    batch = DecoderBatch(cfg, backend.float_dtype, 1)
    batch.admit(encoded.cross, encoded.padding, np.arange(rows))
    rules = StepRules(
        np.full(rows, -1, dtype=np.int64),
        np.zeros(rows, dtype=bool),
        np.zeros(rows, dtype=bool),
        np.zeros(rows, dtype=np.float32),
    )
    scores = np.empty((rows, width), dtype=np.float32)
    for t in range(width):
        positions = np.full(rows, t, dtype=np.int64)
        batch.fit_positions(t + 1)
        feeds = batch.feeds(
            backend.step_spec,
            np.ascontiguousarray(prev[:, t : t + 1]),
            positions,
            rules,
            score_ids=np.ascontiguousarray(target[:, t : t + 1, None]),
        )
        out = backend.run_step(feeds)
        batch.write(out.new_kv, positions)
        scores[:, t] = out.token_scores[:, 0, 0]
    return [[float(x) for x in scores[r, : len(t)]] for r, t in enumerate(targets)]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _variant_record(runs: list[float], hyps: list, sentences: list) -> dict:
    best = [h[0].tokens for h in hyps]
    tokens = sum(len(t) for t in best)  # </s> and any forced prefix included
    total = float(np.median(runs))
    rec = {
        "reps": len(runs),
        "total_s": total,
        "runs_s": runs,
        "output_tokens": tokens,
        "lengths": sorted({len(t) for t in best}),
        "tokens_per_s": tokens / total,
        "sentences_per_s": len(best) / total,
    }
    wanted = [c for s in sentences for c in s.constraints]
    if wanted:
        met = [occurs(t, c) for s, t in zip(sentences, best) for c in s.constraints]
        rec |= {"constraints": len(wanted), "constraints_met": float(np.mean(met))}
    if sentences[0].prefix:
        rec["prefix_kept"] = float(
            np.mean([list(t[: len(s.prefix)]) == list(s.prefix) for s, t in zip(sentences, best)])
        )
    return rec


def measure_control(backend, spec: dict) -> dict:
    """The decoding-control section of one backend: spec {beam, batch, src_len, n, prefix_len,
    constraints, constraint_len, reps, seed}."""
    from deltalm.scoring import score_pairs

    from .workloads import forced_length_options, make_sources

    cfg = backend.cfg
    beam, batch, n, reps = spec["beam"], spec["batch"], spec["n"], spec["reps"]
    src = make_sources(cfg.vocab_size, cfg.eos, cfg.pad, batch, spec["src_len"], seed=spec["seed"] + 7)
    opts = forced_length_options(beam, n)
    sentences = {
        v: control_sentences(
            src,
            cfg.pad,
            cfg.vocab_size,
            opts,
            v,
            spec["prefix_len"],
            spec["constraints"],
            spec["constraint_len"],
            spec["seed"] + 11,
        )
        for v in VARIANTS
    }
    # warm-up: every variant once, shortened (shapes, allocations, thread pools)
    short = forced_length_options(beam, min(n, 4))
    for v in VARIANTS:
        decode_sentences(
            backend,
            control_sentences(
                src,
                cfg.pad,
                cfg.vocab_size,
                short,
                v,
                min(spec["prefix_len"], 2),
                spec["constraints"],
                1,
                spec["seed"] + 11,
            ),
        )
    runs: dict = {v: [] for v in VARIANTS}
    hyps: dict = {}
    for _ in range(reps):
        for v in VARIANTS:
            hyps[v], s = _timed(lambda v=v: decode_sentences(backend, sentences[v]))
            runs[v].append(s)
    variants = {v: _variant_record(runs[v], hyps[v], sentences[v]) for v in VARIANTS}
    plain = variants["plain"]["tokens_per_s"]
    for v in VARIANTS:
        variants[v]["ratio_to_plain"] = variants[v]["tokens_per_s"] / plain

    # scoring: the plain variant's best hypotheses as targets
    sources = [s.src for s in sentences["plain"]]
    targets = [h[0].tokens for h in hyps["plain"]]
    score_pairs(backend, sources[:2], targets[:2])  # warm-up of the whole-target shape
    score_per_step(backend, sources[:2], [t[:4] for t in targets[:2]])
    one_run, per_step = [], []
    for _ in range(reps):
        whole, s = _timed(lambda: score_pairs(backend, sources, targets))
        one_run.append(s)
        stepped, s = _timed(lambda: score_per_step(backend, sources, targets))
        per_step.append(s)
    tokens = sum(len(t) for t in targets)
    diff = max(abs(a - b) for w, p in zip(whole, stepped) for a, b in zip(w, p))
    agree = [np.allclose(w, p, atol=1e-3) for w, p in zip(whole, stepped)]

    def rec(r):
        t = float(np.median(r))
        return {"total_s": t, "runs_s": r, "pairs_per_s": len(targets) / t, "target_tokens_per_s": tokens / t}

    scoring = {
        "pairs": len(targets),
        "target_tokens": tokens,
        "target_len": max(len(t) for t in targets),
        "one_run": rec(one_run),
        "per_step": rec(per_step),
        "max_abs_score_diff": float(diff),
        "agree": float(np.mean(agree)),
        "translation_tokens_per_s": plain,
    }
    scoring["speedup_over_per_step"] = scoring["per_step"]["total_s"] / scoring["one_run"]["total_s"]
    scoring["ratio_to_translation"] = scoring["one_run"]["target_tokens_per_s"] / plain
    return {
        "beam": beam,
        "batch": batch,
        "src_len": spec["src_len"],
        "n_target": n,
        "prefix_len": spec["prefix_len"],
        "constraints_per_sentence": spec["constraints"],
        "constraint_len": spec["constraint_len"],
        "variants": variants,
        "scoring": scoring,
    }


def control_worker(spec: dict) -> dict:
    """The child of one ort backend: spec {kind, artifact, threads, quiet_wait_s, and those of
    measure_control}; its load figures and peak RSS too."""
    from .children import PeakMeter, machine_busy_s, wait_for_quiet
    from .measure import load_figures

    backend, figures = load_figures(spec["kind"], spec["artifact"], spec["threads"])
    quiet = wait_for_quiet(spec["quiet_wait_s"]) if spec.get("quiet_wait_s") else None
    meter = PeakMeter()
    meter.start()
    import os

    busy0, cpu0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
    res = measure_control(backend, spec)
    wall = time.perf_counter() - t0
    others = max(0.0, machine_busy_s() - busy0 - (time.process_time() - cpu0)) / (wall * (os.cpu_count() or 1))
    backend.close()
    v = res["variants"]
    log(
        f"  {spec['kind']:<9} control: plain {v['plain']['tokens_per_s']:.1f} tok/s, prefix x"
        f"{v['prefix']['ratio_to_plain']:.2f}, ordered x{v['ordered']['ratio_to_plain']:.2f}, unordered x"
        f"{v['unordered']['ratio_to_plain']:.2f}; scoring {res['scoring']['one_run']['target_tokens_per_s']:.0f} tok/s "
        f"= {res['scoring']['speedup_over_per_step']:.1f}x per-step teacher forcing"
    )
    return res | {
        "kind": spec["kind"],
        "rss_after_load_mb": figures["rss_after_load_mb"],
        "peak_rss_mb": meter.stop(),
        "wall_s": round(wall, 1),
        "others_cpu_share": round(others, 3),
        "quiet_gate": quiet,
    }


# --- the demo model: how many constraints reach the output ----------------------------------------


def pick_constraint(best: list[int], candidates: list[str], ids_of) -> str | None:
    """The first of ``candidates`` (words, in order) whose ids (``ids_of``) the best hypothesis's
    ids ``best`` do not contain, or None."""
    for word in candidates:
        ids = ids_of(word)
        if ids and not occurs(best, ids):
            return word
    return None


def constraint_share(artifact, threads: int, sentences: int = 24, beam: int = 5) -> dict:
    """On the demo model (a copy task: the reference of a corpus sentence is the sentence): per
    sentence one constraint, a word, of two kinds:

    - ``reference``: a word of the sentence's reference (the k-th word of sentence k, cyclically);
    - ``nbest``: the first word of a lower-ranked hypothesis of its beam-5 n-best (in rank order)
      whose ids its best hypothesis lacks (so its share without constraints is 0 by
      construction), for the sentences that have one.

    Per kind, the share of constraints found (as id sequences) in the best hypothesis without and
    with constrained decoding (ordered and unordered), and that share over the completed
    hypotheses (those that ended before the maximum length: one that reaches it before meeting
    its constraints ends without them). Deterministic (beam search, a fixed sample of the corpus)."""
    from deltalm.export.toy_data import toy_corpus
    from deltalm.search import max_length
    from deltalm.translator import Translator

    corpus = toy_corpus()
    lines = corpus[3 :: len(corpus) // sentences][:sentences]
    out = {"sentences": len(lines), "beam": beam}
    with Translator(artifact, threads=threads) as tr:
        opts = tr.options(beam=beam, nbest=beam)
        ids_of = tr._target_ids
        plain = tr.translate_batch(lines, options=opts)
        best = [t.hypotheses[0].tokens for t in plain]
        picks = {"reference": [(k, line.split()[k % len(line.split())]) for k, line in enumerate(lines)], "nbest": []}
        for k, t in enumerate(plain):
            word = pick_constraint(best[k], [w for h in t.hypotheses[1:] for w in h.text.split()], ids_of)
            if word is not None:
                picks["nbest"].append((k, word))
        for kind, chosen in picks.items():
            if not chosen:
                out[kind] = {"constraints": 0}
                continue
            keep, words = [k for k, _ in chosen], [w for _, w in chosen]
            ids = [ids_of(w) for w in words]
            rec = {
                "constraints": len(chosen),
                "without": float(np.mean([occurs(best[k], c) for k, c in zip(keep, ids)])),
            }
            for order in ("ordered", "unordered"):
                got = tr.translate_batch(
                    [lines[k] for k in keep],
                    options=tr.options(beam=beam, constraint_order=order),
                    constraints=[[w] for w in words],
                )
                hyps = [g.hypotheses[0] for g in got]
                met = [occurs(h.tokens, c) for h, c in zip(hyps, ids)]
                limits = [
                    max_length(opts, len(s.src), tr.config.max_positions)
                    for s in tr.prepare([lines[k] for k in keep], opts)
                ]
                done = [len(h.tokens) - 1 < m for h, m in zip(hyps, limits)]
                rec[order] = {
                    "share": float(np.mean(met)),
                    "completed": int(sum(done)),
                    "share_completed": float(np.mean([m for m, d in zip(met, done) if d])) if any(done) else None,
                    "changed": float(np.mean([h.tokens != best[k] for h, k in zip(hyps, keep)])),
                }
            rec["examples"] = [
                {
                    "source": lines[k],
                    "best": plain[k].hypotheses[0].text,
                    "constraint": w,
                    "constrained": g.hypotheses[0].text,
                }
                for k, w, g in list(zip(keep, words, got))[:2]
            ]
            out[kind] = rec
    return out
