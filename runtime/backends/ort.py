"""ONNX Runtime backend: the artifact's encoder and decoder_step graphs.

Caches never travel through numpy: the encoder's cross K/V and each step's present K/V stay
OrtValues (on the device with ``device="cuda"``), bound as the next step's inputs through IO
binding; only tokens / reorder indices go in and only the top-k (or, when asked, the log-probs)
come out.
"""
from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

import numpy as np

from ..artifact import Artifact, open_artifact, verify_files
from ..errors import ArtifactError, InputError
from ..graphs import SHORTLIST_STEP, cross_names, past_names, present_names


def session_options(threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The step's shapes change every step (past_len) and batch: ORT would keep one memory plan per
    # shape set, and RSS would grow over a long run (the soak test measured +17.5%; +1.2% without).
    so.enable_mem_pattern = False
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def providers_for(device: str) -> list:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "--device cuda needs onnxruntime-gpu with the CUDA execution provider "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    raise InputError(f"unknown device {device!r} (cpu or cuda)")


@dataclass
class OrtState:
    cross: dict  # name -> OrtValue [batch, H, S, hd]
    src_padding: object  # OrtValue [batch, S] bool
    past: dict | None  # name -> OrtValue [rows, H, P, hd]
    candidates: np.ndarray | None = None  # [C] int64: the vocabulary shortlist of this batch


class OrtBackend:
    """``shortlist=True``: the step graph over a vocabulary shortlist (``decoder_step_shortlist``)
    is loaded instead of the full one; ``encode`` then takes the batch's candidates."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None, shortlist: bool = False):
        import onnxruntime as ort

        self.ort = ort
        self.artifact = artifact
        self.cfg = artifact.config
        if not self.cfg.is_encoder_decoder:
            raise InputError(f"{artifact.path}: an encoder-only model ({self.cfg.kind}) cannot translate")
        self.device = device
        self.device_type = "cuda" if device == "cuda" else "cpu"
        self.shortlist = shortlist
        step_graph = SHORTLIST_STEP if shortlist else "decoder_step"
        if step_graph not in artifact.manifest.graphs:
            raise InputError(f"{artifact.path} has no {step_graph} graph (exported by an older version): "
                             "export it again to use a vocabulary shortlist")
        providers = providers_for(device)
        so = session_options(threads)
        # The two sessions are built at once: most of a session's creation is prepacking its
        # weights (measured on base: 1.4 of the step's 1.5 s), which ONNX Runtime does with the
        # GIL released, so the load costs the longer of the two, not their sum.
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="deltalm-session") as pool:
            futures = [pool.submit(ort.InferenceSession, str(artifact.graph_path(g)), so, providers=providers)
                       for g in ("encoder", step_graph)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{artifact.path}: ONNX Runtime cannot load the graphs: {errors[0]}") from None
        self.encoder, self.decoder = (f.result() for f in futures)
        self.encoder_spec = artifact.graph_spec("encoder")
        self.step_spec = artifact.graph_spec(step_graph)
        self.topk = int(self.step_spec.outputs[0].shape[1])
        self.float_dtype = np.dtype(self.step_spec.outputs[-1].dtype)
        n = self.cfg.decoder_layers
        self._cross_names = [name for i in range(n) for name in cross_names(i)]
        self._past_names = [name for i in range(n) for name in past_names(i)]
        self._present_names = [name for i in range(n) for name in present_names(i)]

    @classmethod
    def from_artifact(cls, path, device: str = "cpu", threads: int | None = None, shortlist: bool = False,
                      **_) -> "OrtBackend":
        """Open and hash-check the artifact, and load its graphs. The sha256 check of every file
        runs in a thread while ONNX Runtime builds the sessions (hashlib releases the GIL), so the
        start-up costs the longer of the two, not their sum; a mismatch is reported before any
        loading error, and no backend is returned unless every file matched."""
        artifact = open_artifact(path, verify=False)  # structure and presence now, hashes below
        failures: list[ArtifactError] = []

        def check():
            try:
                verify_files(artifact.path, artifact.manifest, list(artifact.manifest.files))
            except ArtifactError as e:
                failures.append(e)

        checker = threading.Thread(target=check, name="deltalm-verify", daemon=True)
        checker.start()
        try:
            backend = cls(artifact, device=device, threads=threads, shortlist=shortlist)
        except BaseException:
            checker.join()
            if failures:
                raise failures[0] from None
            raise
        checker.join()
        if failures:
            raise failures[0]
        return backend

    def _value(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, 0)

    def encode(self, src_tokens: np.ndarray, candidates: np.ndarray | None = None) -> OrtState:
        if candidates is not None and not self.shortlist:
            raise InputError("candidates given to a backend opened without the shortlist graph")
        src = np.ascontiguousarray(src_tokens, dtype=np.int64)
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("src_tokens", src)
        for name in self._cross_names:
            binding.bind_output(name, self.device_type)
        self.encoder.run_with_iobinding(binding)
        outs = dict(zip(self._cross_names, binding.get_outputs()))
        if self.shortlist and candidates is None:  # the shortlist graph over the whole vocabulary
            candidates = np.arange(self.cfg.vocab_size, dtype=np.int64)
        return OrtState(cross=outs, src_padding=self._value(src == self.cfg.pad), past=None,
                        candidates=None if candidates is None else np.ascontiguousarray(candidates, dtype=np.int64))

    def step(self, state: OrtState, tokens, step, reorder, sent_index, rules, want="topk"):
        cfg = self.cfg
        rows = len(tokens)
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("step", np.array(step, dtype=np.int64))
        binding.bind_cpu_input("reorder", np.ascontiguousarray(reorder, dtype=np.int64))
        binding.bind_cpu_input("sent_index", np.ascontiguousarray(sent_index, dtype=np.int64))
        binding.bind_ortvalue_input("src_padding", state.src_padding)
        if state.past is None:
            empty = np.zeros((rows, cfg.heads, 0, cfg.head_dim), dtype=self.float_dtype)
            for name in self._past_names:
                binding.bind_cpu_input(name, empty)
        else:
            for name in self._past_names:
                binding.bind_ortvalue_input(name, state.past[name])
        for name in self._cross_names:
            binding.bind_ortvalue_input(name, state.cross[name])
        binding.bind_cpu_input("forced_tokens", np.ascontiguousarray(rules.forced_tokens, dtype=np.int64))
        binding.bind_cpu_input("ban_eos", np.array(bool(rules.ban_eos)))
        binding.bind_cpu_input("only_eos", np.array(bool(rules.only_eos)))
        binding.bind_cpu_input("unk_penalty", np.array(rules.unk_penalty, dtype=np.float32))
        if state.candidates is not None:
            binding.bind_cpu_input("candidates", state.candidates)
        wanted = ["topk_scores", "topk_ids"] if want == "topk" else ["log_probs"]
        for name in wanted:
            binding.bind_output(name, "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device_type)
        self.decoder.run_with_iobinding(binding)
        outs = binding.get_outputs()
        state.past = {p: v for p, v in zip(self._past_names, outs[len(wanted):])}
        if want == "topk":
            return outs[0].numpy(), outs[1].numpy()
        if state.candidates is None:
            return outs[0].numpy()
        full = np.full((rows, cfg.vocab_size), -np.inf, dtype=np.float32)  # tokens off the shortlist
        full[:, state.candidates] = outs[0].numpy()
        return full

