"""The preprocessing engine: raw text in, token shards + manifest + dataset card out.

    python -m llmops_trainer.data --config /etc/llmops/dataset.json \
        --stage slice|dedup|prepare|tokenize|finalize

Stages and files are described in `slice_stage`, `dedup_stage`, `prepare_stage`,
`tokenize_stage` and `finalize_stage`; the document steps are registered, in order, in
`steps` and implemented in one module each (collect, normalize, dedup, filters, language,
pii, augment, tokenize, report).
"""

from llmops_trainer.data.pipeline import Options, run_finalize, run_local, run_slice

__all__ = ["Options", "run_finalize", "run_local", "run_slice"]
