"""``deltalm bench``: a tool of its own over the library (needs the ``bench`` extra; models to
export need the ``export`` extra). One module per concern:

- ``command``: the ``deltalm bench`` command (``add_arguments``, ``bench_command``), the run's flow;
- ``__main__``: the child processes (``python -m deltalm.bench worker|profile|engine|cli ...``);
- ``children``: running children, their wall / CPU time, RSS from /proc, this machine's load;
- ``models``: the tiny / base checkpoints or a given artifact, exports per precision, file sizes;
- ``settings``: presets per model size, the backends and which are available;
- ``workloads``: workloads, random sources, forced-length options, timing statistics;
- ``measure``: one backend's child (load figures, every workload), memory check, agreement
  (through deltalm.compare);
- ``floors`` / ``step_cost``: the machine's GEMM peak and bandwidth, what one step must cost;
- ``profile``: ONNX Runtime's profiler on the decoder step;
- ``ct2_model`` / ``side_by_side``: the FLOP-identical CTranslate2 model, the interleaved run;
- ``report``: derived figures, targets, markdown tables and the chart;
- ``progress``: log lines and a progress bar on stderr when it is a terminal.
"""
