"""Dataset -> its children: config, output claim, and two Jobs per version.

Processing runs in two Jobs rather than one with stages: an Indexed Job whose pods each take a
deterministic slice of the inputs (`JOB_COMPLETION_INDEX`), then a single merge Job that
removes duplicates across slices, tokenizes, splits and shards. Kubernetes then tracks, retries
and reports each part on its own, and a rerun of the slice Job skips finished slices.

Each version of the spec (its metadata.generation) writes to its own folder `g<generation>`
on the output volume, so reprocessing never overwrites data a TrainingRun may still read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmops.api.dataset import Dataset
from llmops.builders import pods, storage
from llmops.builders.common import child_metadata, child_name
from llmops.builders.common import config_map as common_config_map

COMPONENT = "preprocessing"
CONFIG_DIR = "/etc/llmops"
CONFIG_FILE = "dataset.json"
OUTPUT_DIR = "/output"
# Each pod retries a failed slice this often before the whole version is marked Failed.
RETRIES_PER_SLICE = 2
TERMINATION_MESSAGE = "/dev/termination-log"


def version(generation: int) -> str:
    return f"g{generation}"


def slices_job_name(name: str, generation: int) -> str:
    return child_name(name, f"slices-{version(generation)}")


def merge_job_name(name: str, generation: int) -> str:
    return child_name(name, f"merge-{version(generation)}")


def output_uri(dataset: Dataset, generation: int) -> str:
    base = storage.uri(dataset.metadata.name, "data", dataset.spec.output)
    return f"{base}/{version(generation)}"


def config_map(body: Mapping[str, Any]) -> dict[str, Any]:
    return common_config_map(body, CONFIG_FILE, COMPONENT)


def output_claim(body: Mapping[str, Any], dataset: Dataset) -> dict[str, Any] | None:
    return storage.owned_claim(
        body, "data", COMPONENT, dataset.spec.output, retain=dataset.spec.retain_policy == "Retain"
    )


def _job(
    body: Mapping[str, Any], dataset: Dataset, stage: str, generation: int, completions: int
) -> dict[str, Any]:
    spec = dataset.spec
    name = dataset.metadata.name
    out_volumes, out_mounts = storage.mount("output", name, "data", spec.output, OUTPUT_DIR)
    scratch_volumes, scratch_mounts = pods.scratch_volumes()
    output_dir = f"{OUTPUT_DIR}/{version(generation)}"
    env = [
        {"name": "LLMOPS_OUTPUT_DIR", "value": output_dir},
        {"name": "LLMOPS_WORK_DIR", "value": f"{output_dir}/.work"},
        {"name": "LLMOPS_NUM_SLICES", "value": str(spec.parallelism)},
        {"name": "LLMOPS_TERMINATION_LOG", "value": TERMINATION_MESSAGE},
        {"name": "HOME", "value": "/tmp"},
    ]
    role = f"{'slices' if stage == 'slice' else 'merge'}-{version(generation)}"
    metadata = child_metadata(
        body,
        role,
        COMPONENT,
        **{"llmops.dev/generation": str(generation)},
        **pods.queue_labels(spec.scheduling),
    )
    job_spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": completions,
        "template": {
            "metadata": {"labels": {**metadata["labels"], "llmops.dev/stage": stage}},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pods.pod_security_context(),
                "containers": [
                    {
                        "name": stage,
                        "image": pods.trainer_image(spec.resources),
                        "command": [
                            "python",
                            "-m",
                            "llmops_trainer.data",
                            "--config",
                            f"{CONFIG_DIR}/{CONFIG_FILE}",
                            "--stage",
                            stage,
                        ],
                        "env": env,
                        "resources": pods.container_resources(spec.resources),
                        "securityContext": pods.container_security_context(),
                        # The merge step reports its statistics here for the Dataset status.
                        "terminationMessagePath": TERMINATION_MESSAGE,
                        "terminationMessagePolicy": "File",
                        "volumeMounts": [
                            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                            *scratch_mounts,
                            *out_mounts,
                        ],
                    }
                ],
                "volumes": [
                    {"name": "config", "configMap": {"name": child_name(name, "config")}},
                    *scratch_volumes,
                    *out_volumes,
                ],
                **pods.scheduling_fields(spec.scheduling),
            },
        },
    }
    if stage == "slice":
        job_spec.update(
            completionMode="Indexed", backoffLimitPerIndex=RETRIES_PER_SLICE, maxFailedIndexes=0
        )
    else:
        job_spec["backoffLimit"] = RETRIES_PER_SLICE
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def slices_job(body: Mapping[str, Any], dataset: Dataset, generation: int) -> dict[str, Any]:
    return _job(body, dataset, "slice", generation, dataset.spec.parallelism)


def merge_job(body: Mapping[str, Any], dataset: Dataset, generation: int) -> dict[str, Any]:
    return _job(body, dataset, "merge", generation, 1)


def status_from_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """Dataset status fields from the merge step's report (camelCase, as in DatasetStatus);
    unknown keys are dropped so a newer engine cannot write fields the schema lacks."""
    allowed = (
        "steps",
        "documents",
        "tokens",
        "totalTokens",
        "exactDuplicateRatio",
        "nearDuplicateRatio",
        "languages",
        "vocabSize",
        "fingerprint",
    )
    return {k: report[k] for k in allowed if k in report}
