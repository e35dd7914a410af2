"""Standard benchmarks on the final model with EleutherAI's lm-evaluation-harness (`lm-eval`).

Rank 0 runs them after the final evaluation, on the exported model folder (what users load
with `from_pretrained`, so the scores are those of the published model), offline:

- Each benchmark's task folder (lm-eval task YAML files and their data) comes from a path in
  the image, a claim or a ConfigMap mounted by the operator (`Env.BENCHMARK_TASKS` + index),
  or an s3:// prefix copied here. It is copied into scratch (a ConfigMap volume's `..data`
  links would show every file twice) and lm-eval runs inside the copy, so data files named
  relative to the task YAML (`dataset_kwargs: {data_files: {test: data.jsonl}}`) are found.
- Only the tasks of that folder are indexed (not lm-eval's built-in catalogue, whose tasks
  download their data from the Hub): a benchmark names a task or group defined there.
- HF_DATASETS_OFFLINE and HF_HUB_OFFLINE are set: nothing is downloaded at run time.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.api.trainingrun import Benchmark, BenchmarkScore
from llmops.api.workload import BenchmarkResult, Env

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


class BenchmarkError(ValueError):
    """A benchmark that cannot run as configured (missing folder, task or metric)."""


@dataclass(frozen=True)
class ModelFolders:
    """What lm-eval loads: a full model folder, or a base model and a peft adapter."""

    model: Path
    adapter: Path | None = None
    prefix_token_id: int | None = None  # for a tokenizer without special tokens


def go_offline() -> None:
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)


def _ignore_links(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if name.startswith("..")]


def _fetch_s3(uri: str, index: int, into: Path) -> None:
    import boto3

    from llmops_trainer.model_init import s3_keys

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = boto3.client(
        "s3",
        endpoint_url=os.environ.get(f"{Env.BENCHMARK_S3_ENDPOINT}{index}")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None,
        aws_access_key_id=os.environ.get(f"{Env.BENCHMARK_S3_ACCESS_KEY}{index}"),
        aws_secret_access_key=os.environ.get(f"{Env.BENCHMARK_S3_SECRET_KEY}{index}"),
    )
    keys = list(s3_keys(client, bucket, prefix))
    if not keys:
        raise BenchmarkError(f"{uri}: no objects under the prefix")
    for key in keys:
        relative = Path(key[len(prefix) :])
        if relative.is_absolute() or ".." in relative.parts:
            raise BenchmarkError(f"{uri}: refusing object name {key!r}")
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(target))


def task_folder(index: int, benchmark: Benchmark, scratch: Path) -> Path:
    """A private copy of benchmark `index`'s task folder under `scratch`."""
    source = os.environ.get(f"{Env.BENCHMARK_TASKS}{index}")
    tasks = benchmark.tasks
    if source is None:
        # Outside a pod built by the operator (a shell, a test): a path in the image or an
        # s3:// URI is usable as it is; a claim or ConfigMap needs the operator's mount.
        if tasks.path is None or tasks.path.startswith("pvc://"):
            raise BenchmarkError(
                f"benchmark {benchmark.name}: its tasks folder needs "
                f"{Env.BENCHMARK_TASKS}{index} (set by the operator)"
            )
        source = tasks.path
    target = scratch / str(index)
    shutil.rmtree(target, ignore_errors=True)
    if source.startswith("s3://"):
        target.mkdir(parents=True)
        _fetch_s3(source, index, target)
    else:
        if not Path(source).is_dir():
            raise BenchmarkError(f"benchmark {benchmark.name}: no tasks folder at {source}")
        shutil.copytree(source, target, ignore=_ignore_links)
    if not any(target.rglob("*.yaml")) and not any(target.rglob("*.yml")):
        raise BenchmarkError(f"benchmark {benchmark.name}: no task YAML in {source}")
    return target


def _task_manager(folder: Path) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def prepare(benchmarks: Sequence[Benchmark], scratch: Path) -> list[Path]:
    """Copy every task folder and check it defines the benchmark's task: at set-up, so a
    wrong name fails the run before training rather than after."""
    go_offline()
    folders = []
    for index, benchmark in enumerate(benchmarks):
        folder = task_folder(index, benchmark, scratch)
        known = set(_task_manager(folder).all_tasks)
        if benchmark.name not in known:
            listed = ", ".join(sorted(known)[:20]) or "none"
            raise BenchmarkError(
                f"benchmark {benchmark.name}: no such task or group in its tasks folder "
                f"(it defines: {listed})"
            )
        folders.append(folder)
    return folders


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as the working folder: relative data files resolve against it."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `acc,none` / `acc_stderr,none` keys as `acc` / `acc_stderr` (other filters
    keep theirs: `exact_match,strict-match` -> `exact_match/strict-match`)."""
    metrics: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key:
            continue
        number = _number(value)
        if number is None:
            continue
        metric, _, filter_name = key.partition(",")
        metrics[metric if filter_name == "none" else f"{metric}/{filter_name}"] = number
    return metrics


def summarize(benchmark: Benchmark, results: dict[str, Any]) -> BenchmarkResult:
    """The benchmark's score and every metric of its tasks, from simple_evaluate's output."""
    per_task = {name: _metrics(entry) for name, entry in (results.get("results") or {}).items()}
    # a group's aggregate, when it has one, is under "groups" in some lm-eval releases
    for name, entry in (results.get("groups") or {}).items():
        per_task.setdefault(name, {}).update(_metrics(entry))
    samples = {
        name: int(counts.get("effective", counts.get("original", 0)))
        for name, counts in (results.get("n-samples") or {}).items()
    }
    mine = per_task.get(benchmark.name)
    if not mine:
        raise BenchmarkError(f"benchmark {benchmark.name}: lm-eval returned no results for it")
    metric = benchmark.metric
    key = metric if metric in mine else next((k for k in mine if k.startswith(metric + "/")), None)
    if key is None:
        reported = ", ".join(sorted(k for k in mine if "_stderr" not in k))
        raise BenchmarkError(
            f"benchmark {benchmark.name}: no metric {metric!r} (it reports: {reported})"
        )
    stem, _, filter_name = key.partition("/")
    stderr = mine.get(f"{stem}_stderr" + (f"/{filter_name}" if filter_name else ""))
    higher = (results.get("higher_is_better") or {}).get(benchmark.name) or {}
    score = BenchmarkScore(
        name=benchmark.name,
        metric=key,
        value=mine[key],
        stderr=stderr,
        higher_is_better=bool(higher.get(stem, True)),
        samples=sum(samples.values()) if samples else None,
    )
    return BenchmarkResult(
        name=benchmark.name,
        score=score,
        num_fewshot=benchmark.num_fewshot,
        limit=benchmark.limit,
        tasks=per_task,
        samples=samples,
    )


def _model(folders: ModelFolders, device: str, batch_size: int) -> Any:
    """lm-eval's HFLM around a model loaded here: given a loaded model, lm-eval stays a
    single process (rank 0 of the gang runs alone; its Accelerator would join the others)."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    network: Any = AutoModelForCausalLM.from_pretrained(str(folders.model), dtype=dtype)
    if folders.adapter is not None:
        from peft import PeftModel

        network = PeftModel.from_pretrained(network, str(folders.adapter)).merge_and_unload()
    network.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folders.adapter or folders.model))
    return HFLM(
        pretrained=network,
        tokenizer=tokenizer,
        batch_size=batch_size,
        prefix_token_id=folders.prefix_token_id,
    )


def run(
    benchmarks: Sequence[Benchmark],
    task_folders: Sequence[Path],
    folders: ModelFolders,
    device: str,
    seed: int = 0,
) -> list[BenchmarkResult]:
    """Every benchmark on the model, one lm-eval run each (their settings differ)."""
    import lm_eval

    go_offline()
    results = []
    models: dict[int, Any] = {}  # by batch size
    for benchmark, tasks in zip(benchmarks, task_folders, strict=True):
        model = models.get(benchmark.batch_size)
        if model is None:
            models.clear()  # one copy of the weights at a time
            model = models[benchmark.batch_size] = _model(folders, device, benchmark.batch_size)
        with _inside(tasks):
            output = lm_eval.simple_evaluate(
                model=model,
                tasks=[benchmark.name],
                task_manager=_task_manager(tasks),
                num_fewshot=benchmark.num_fewshot,
                limit=benchmark.limit,
                log_samples=False,
                bootstrap_iters=1000,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        if output is None:  # simple_evaluate returns None on ranks other than 0
            raise BenchmarkError(f"benchmark {benchmark.name}: lm-eval returned nothing")
        results.append(summarize(benchmark, output))
    return results
