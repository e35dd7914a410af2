"""The preprocessing engine: raw text in, token shards + manifest + dataset card out.

    python -m llmops_trainer.data --config /etc/llmops/dataset.json --stage slice|dedup|merge

Stages and files are described in `slice_stage`, `dedup_stage` and `merge_stage`; the
document steps are registered, in order, in `steps` and implemented in one module each
(collect, normalize, dedup, filters, language, pii, augment, tokenize, report).
"""

from llmops_trainer.data.pipeline import Options, run_local, run_merge, run_slice

__all__ = ["Options", "run_local", "run_merge", "run_slice"]
