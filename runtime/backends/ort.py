"""ONNX Runtime backend: the artifact's encoder and decoder_step graphs.

Every feed is bound in place through IO binding (on the CPU, ONNX Runtime reads the caller's
arrays, the caches included, without copying them) and every output is written into an array
allocated here for it, so a step adds nothing to ONNX Runtime's arena but its intermediates. With
``device="cuda"`` the feeds are copied to the GPU at every step (the caches live on the host: see
docs/limits.md).
"""

from __future__ import annotations

import concurrent.futures
import threading

import numpy as np

from ..artifact import Artifact, check_can_decode, open_artifact, verify_files
from ..errors import ArtifactError, InputError
from ..graphs import SHORTLIST_STEP, cross_names, per_layer
from .interface import BatchLimits, Encoded, StepOutput, step_output_shapes


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


class OrtBackend:
    """``shortlist=True``: the step graph over a vocabulary shortlist (``decoder_step_shortlist``)
    is loaded instead of the full one; ``encode`` then takes the batch's candidates."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None, shortlist: bool = False):
        import onnxruntime as ort

        self.ort = ort
        self.artifact = artifact
        self.cfg = artifact.config
        check_can_decode(artifact)
        self.device = device
        self.device_type = "cuda" if device == "cuda" else "cpu"
        self.shortlist = shortlist
        step_graph = SHORTLIST_STEP if shortlist else "decoder_step"
        if step_graph not in artifact.manifest.graphs:
            raise InputError(
                f"{artifact.path} has no {step_graph} graph (exported by an older version): "
                "export it again to use a vocabulary shortlist"
            )
        providers = providers_for(device)
        so = session_options(threads)
        # The two sessions are built at once: most of a session's creation is prepacking its
        # weights (measured on base: 1.4 of the step's 1.5 s), which ONNX Runtime does with the
        # GIL released, so the load costs the longer of the two, not their sum.
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="deltalm-session") as pool:
            futures = [
                pool.submit(ort.InferenceSession, str(artifact.graph_path(g)), so, providers=providers)
                for g in ("encoder", step_graph)
            ]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{artifact.path}: ONNX Runtime cannot load the graphs: {errors[0]}") from None
        self.encoder, self.decoder = (f.result() for f in futures)
        self.encoder_spec = artifact.graph_spec("encoder")
        self.step_spec = artifact.graph_spec(step_graph)
        self.topk = int(self.step_spec.outputs[0].shape[-1])
        self.float_dtype = np.dtype(self.step_spec.outputs[-1].dtype)
        self._cross_names = per_layer(self.cfg, cross_names)
        self.limits = BatchLimits()

    @classmethod
    def from_artifact(
        cls, path, device: str = "cpu", threads: int | None = None, shortlist: bool = False, **_
    ) -> OrtBackend:
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

    def close(self) -> None:
        self.encoder = self.decoder = None

    def encode(self, src_tokens: np.ndarray) -> Encoded:
        src = np.ascontiguousarray(src_tokens, dtype=np.int64)
        batch, src_len = src.shape
        binding = self.encoder.io_binding()
        binding.bind_cpu_input("src_tokens", src)
        cross = []
        for name in self._cross_names:
            out = np.empty((batch, self.cfg.heads, src_len, self.cfg.head_dim), dtype=self.float_dtype)
            _bind_output(binding, name, out)
            cross.append(out)
        self.encoder.run_with_iobinding(binding)
        return Encoded(cross=cross, padding=src == self.cfg.pad)

    def run_step(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        binding = self.decoder.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        outputs = {
            name: np.empty(shape, dtype=dtype)
            for name, (shape, dtype) in step_output_shapes(self.cfg, self.step_spec, feeds).items()
        }
        for name, array in outputs.items():
            _bind_output(binding, name, array)
        self.decoder.run_with_iobinding(binding)
        return StepOutput.from_outputs(self.cfg, outputs)


def _bind_output(binding, name: str, array: np.ndarray) -> None:
    """ONNX Runtime writes output ``name`` into ``array`` (a host array of its final shape)."""
    binding.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
