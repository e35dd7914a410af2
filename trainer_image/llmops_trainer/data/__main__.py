"""Entrypoint of the preprocessing Job's containers.

    python -m llmops_trainer.data --config /etc/llmops/dataset.json \
        --stage slice|dedup|prepare|tokenize|finalize

Environment: LLMOPS_OUTPUT_DIR (dataset root), LLMOPS_WORK_DIR (per-stage results; default
<output>/.work), JOB_COMPLETION_INDEX (the slice, the dedup group or the tokenize pod of an
Indexed Job's pod; the dedup stage has `dedup_groups(spec)` of them, the tokenize stage one
per slice) and LLMOPS_NUM_SLICES (slice count; default spec.parallelism),
LLMOPS_LLM_CACHE_DIR (answers of language models; default <work>/llm-cache) and
LLMOPS_LLM_<i>_{URL,MODEL,API_KEY} (the language models of the spec,
workload.llm_endpoint_env). On failure the step and reason go to the termination message
(LLMOPS_TERMINATION_LOG), where Kubernetes shows them in the pod status; after the
finalize step, the statistics the Dataset status shows go there too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from llmops.api.dataset import Dataset, dedup_groups
from llmops.api.workload import LLM_ENDPOINT_FAILED, DataMergeReport, Env
from llmops_trainer.data.collect import ChecksumError
from llmops_trainer.data.llm_endpoint import EndpointError
from llmops_trainer.data.pipeline import (
    Options,
    run_dedup,
    run_finalize,
    run_prepare,
    run_slice,
    run_tokenize,
)
from llmops_trainer.termination import write_failure, write_termination_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops_trainer.data")
    parser.add_argument("--config", required=True, type=Path, help="the Dataset object as JSON")
    parser.add_argument(
        "--stage", required=True, choices=("slice", "dedup", "prepare", "tokenize", "finalize")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get(Env.LOG_LEVEL, "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        dataset = Dataset.model_validate(json.loads(args.config.read_text()))
        output = Path(os.environ.get(Env.OUTPUT_DIR, "/data"))
        work = Path(os.environ.get(Env.WORK_DIR, str(output / ".work")))
        count = int(os.environ.get(Env.NUM_SLICES, dataset.spec.parallelism))
        index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
        if args.stage == "slice":
            if not 0 <= index < count:
                raise ValueError(f"JOB_COMPLETION_INDEX {index} outside 0..{count - 1}")
            cache = os.environ.get(Env.LLM_CACHE_DIR)
            run_slice(
                dataset, work, index, count, Options(llm_cache=Path(cache) if cache else None)
            )
        elif args.stage == "dedup":
            run_dedup(dataset, work, index, dedup_groups(dataset.spec), count)
        elif args.stage == "prepare":
            run_prepare(dataset, output, work, count)
        elif args.stage == "tokenize":
            if not 0 <= index < count:
                raise ValueError(f"JOB_COMPLETION_INDEX {index} outside 0..{count - 1}")
            run_tokenize(dataset, output, work, index, count)
        else:
            manifest = run_finalize(dataset, output, work, count)
            print(json.dumps({"fingerprint": manifest.fingerprint, "stats": manifest.stats}))
            write_termination_message(DataMergeReport.from_stats(manifest.stats).to_dict())
    except Exception as error:
        reason = _reason(error)
        logging.getLogger("llmops.data").exception("%s stage failed: %s", args.stage, reason)
        _terminate(args.stage, reason, str(error))
        return 1
    return 0


def _reason(error: Exception) -> str:
    if isinstance(error, EndpointError):
        return LLM_ENDPOINT_FAILED
    if isinstance(error, ChecksumError):
        return "ChecksumMismatch"
    if isinstance(error, FileNotFoundError):
        return "InputNotFound"
    if isinstance(error, ValueError):
        return "InvalidConfig"
    if isinstance(error, OSError):
        return "InputUnavailable"
    return "ProcessingFailed"


def _terminate(stage: str, reason: str, message: str) -> None:
    with contextlib.suppress(OSError):
        write_failure(stage, reason, message)


if __name__ == "__main__":
    sys.exit(main())
