"""``deltalm.cluster``: corpus translation on a Ray cluster (``deltalm translate-corpus``).

    from deltalm.cluster import ClusterOptions, CorpusJob, translate_corpus

    job = CorpusJob("artifact", options=deltalm.TranslateOptions(beam=5))
    summary = translate_corpus(job, ["a.txt", "s3://bucket/mono/part-*.txt"], "out",
                               cluster=ClusterOptions(actors=8, threads_per_actor=4))

Ray (the ``ray`` extra) is imported only when a run starts; without it the call raises an
InputError naming the extra to install.
"""

from .runner import RAY_EXTRA, ClusterOptions, CorpusJob, CorpusSummary, translate_corpus
from .shards import MANIFEST_NAME, output_name

__all__ = [
    "translate_corpus",
    "CorpusJob",
    "ClusterOptions",
    "CorpusSummary",
    "RAY_EXTRA",
    "MANIFEST_NAME",
    "output_name",
]
