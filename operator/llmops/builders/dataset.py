"""Dataset -> its children: config, output claim, and a chain of Jobs per version.

Processing runs as one Job per stage (DATA_STAGES), each started when the one before has
completed, each stage's output on the Dataset's volume (or S3) for the next:

1. `slices`: an Indexed Job whose pods each take a deterministic slice of the inputs
   (`JOB_COMPLETION_INDEX`): collect, normalise, filter, hash, MinHash;
2. `dedup`: an Indexed Job of `dedup_groups(spec)` pods, each over one group of LSH bands
   (and one range of content hashes) of every slice: the buckets of near duplicates and
   the later exact copies;
3. `prepare`: one pod that joins the buckets into clusters and per-slice removal lists,
   splits the kept documents, indexes the evaluation n-grams and trains the tokenizer on a
   bounded sample of the training split (or loads it), reading one slice at a time;
4. `tokenize`: an Indexed Job of `parallelism` pods over units of the kept text (each about
   a shard's worth, the same whatever the number of slices): decontaminate, weight,
   augment, tokenize and write the unit's shards;
5. `finalize`: one pod that lists every unit's shards in the manifest and writes the
   statistics, tokenizer and card; it reads no document.

Kubernetes then tracks, retries (a failed index alone) and reports each part on its own,
and a rerun of a stage skips its finished pieces.

Each version of the spec (its metadata.generation) writes to its own folder `g<generation>`
on the output volume, so reprocessing never overwrites data a TrainingRun may still read.

With `tokenizer.fromModel`, every pod but the dedup ones first runs the model initializer with
`--tokenizer-only`: it verifies the model's tokenizer files in place (an image path, a
read-only claim) or downloads only those into the pod's scratch space, and the engine finds
them through Env.PRETRAINED_DIR. The slices need them too: they check the model against the
spec and render chats with its template before the long part of the work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmops.api.common import LocalObjectReference, SecretKeySelector
from llmops.api.dataset import DATA_STAGES, Dataset, dedup_groups
from llmops.api.workload import (
    CONFIG_DIR,
    DATASET_CONFIG_FILE,
    DATASET_OUTPUT_DIR,
    DATASET_VOLUMES_DIR,
    GENERATION_LABEL,
    REFERENCE_TOKENIZER_DIR,
    STAGE_LABEL,
    TERMINATION_LOG,
    TOKENIZER_MODEL_DIR,
    Env,
    data_command,
    llm_endpoint_env,
)
from llmops.builders import pods, pretrained, storage
from llmops.builders.common import child_metadata, child_name
from llmops.builders.common import config_map as common_config_map

COMPONENT = "preprocessing"
CONFIG_FILE = DATASET_CONFIG_FILE
OUTPUT_DIR = DATASET_OUTPUT_DIR
# Each pod retries a failed slice this often before the whole version is marked Failed.
RETRIES_PER_SLICE = 2
INDEXED = ("slice", "dedup", "tokenize")  # Indexed Jobs: one completion index per pod
TERMINATION_MESSAGE = TERMINATION_LOG
VOLUMES_DIR = DATASET_VOLUMES_DIR


def version(generation: int) -> str:
    return f"g{generation}"


def slices_job_name(name: str, generation: int) -> str:
    return child_name(name, f"slices-{version(generation)}")


def dedup_job_name(name: str, generation: int) -> str:
    return child_name(name, f"dedup-{version(generation)}")


def prepare_job_name(name: str, generation: int) -> str:
    return child_name(name, f"prepare-{version(generation)}")


def tokenize_job_name(name: str, generation: int) -> str:
    return child_name(name, f"tokenize-{version(generation)}")


def finalize_job_name(name: str, generation: int) -> str:
    return child_name(name, f"finalize-{version(generation)}")


# stage -> Job name part
ROLES = {
    "slice": "slices",
    "dedup": "dedup",
    "prepare": "prepare",
    "tokenize": "tokenize",
    "finalize": "finalize",
}


def output_uri(dataset: Dataset, generation: int) -> str:
    base = storage.uri(dataset.metadata.name, "data", dataset.spec.output)
    return f"{base}/{version(generation)}"


# `<name>-data-config`: not `<name>-config`, which a ModelDeployment of the same name holds.
CONFIG_ROLE = "data-config"


def config_map(body: Mapping[str, Any]) -> dict[str, Any]:
    return common_config_map(body, CONFIG_FILE, COMPONENT, CONFIG_ROLE)


def output_claim(body: Mapping[str, Any], dataset: Dataset) -> dict[str, Any] | None:
    return storage.owned_claim(
        body, "data", COMPONENT, dataset.spec.output, retain=dataset.spec.retain_policy == "Retain"
    )


def input_volumes(dataset: Dataset) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Claims that sources read from, each mounted read-only once under VOLUMES_DIR, where
    the engine looks for `<claimName>/<path>`."""
    claims = sorted({s.volume.claim_name for s in dataset.spec.sources if s.volume})
    volumes = [
        {"name": f"source-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        for i, claim in enumerate(claims)
    ]
    mounts = [
        {"name": f"source-{i}", "mountPath": f"{VOLUMES_DIR}/{claim}", "readOnly": True}
        for i, claim in enumerate(claims)
    ]
    return volumes, mounts


def credentials_env(dataset: Dataset) -> list[dict[str, Any]]:
    """S3 credentials as the standard AWS variables and the Hub token as `HF_TOKEN`, read
    from their Secrets by the kubelet: the values never pass through the operator, the
    ConfigMap or the pod spec."""
    locations = [s.s3 for s in dataset.spec.sources if s.s3]
    if dataset.spec.output is not None and dataset.spec.output.s3 is not None:
        locations.append(dataset.spec.output.s3)
    s3_secrets = [loc.credentials_secret for loc in locations]
    hub_secrets = [s.hf.credentials_secret for s in dataset.spec.sources if s.hf]
    return [
        *_secret_env("credentials Secret", s3_secrets, pretrained.S3_KEYS),
        *_secret_env("Hub token Secret", hub_secrets, (pretrained.HF_TOKEN_KEY,)),
    ]


def _secret_env(
    what: str, references: list[LocalObjectReference | None], keys: tuple[str, ...]
) -> list[dict[str, Any]]:
    """`keys` of the one Secret the references name (a variable holds one value per pod)."""
    secrets = sorted({ref.name for ref in references if ref is not None})
    if len(secrets) > 1:
        raise ValueError(f"one {what} per Dataset is supported, got {secrets}")
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
        for secret in secrets
        for key in keys
    ]


@dataclass(frozen=True)
class ServedModel:
    """What a Dataset's slices need of a ModelDeployment they ask (pseudo-labelling,
    augmentation): its URL, its served model name and the Secret key of its token."""

    url: str
    model: str
    auth_token_secret: SecretKeySelector | None = None


LLM_CACHE_SUBDIR = ".llm-cache"  # on the output volume, beside the versions: all share it


def model_deployment_names(dataset: Dataset) -> list[str]:
    """The ModelDeployments the Dataset's language-model endpoints name, without repeats."""
    names = [
        e.model_deployment.name
        for _, e in dataset.spec.llm_endpoints()
        if e.model_deployment is not None
    ]
    return list(dict.fromkeys(names))


def llm_env(
    dataset: Dataset, deployments: Mapping[str, ServedModel] | None = None
) -> list[dict[str, Any]]:
    """Where each language model of the spec is (workload.llm_endpoint_env): a
    ModelDeployment's URL and served name as resolved by the caller, the API key as a
    secretKeyRef (the endpoint's apiKeySecret, else the deployment's authTokenSecret), and
    the answer cache on the output volume (a claim; an S3 output keeps it in the work
    folder)."""
    endpoints = dataset.spec.llm_endpoints()
    if not endpoints:
        return []
    env: list[dict[str, Any]] = []
    if storage.claim_name(dataset.metadata.name, "data", dataset.spec.output) is not None:
        env.append({"name": Env.LLM_CACHE_DIR, "value": f"{OUTPUT_DIR}/{LLM_CACHE_SUBDIR}"})
    for index, (what, endpoint) in enumerate(endpoints):
        names = llm_endpoint_env(index)
        secret = endpoint.api_key_secret
        if endpoint.model_deployment is not None:
            served = (deployments or {}).get(endpoint.model_deployment.name)
            if served is None:
                raise ValueError(
                    f"{what}: ModelDeployment {endpoint.model_deployment.name!r} is not resolved"
                )
            env.append({"name": names.url, "value": served.url})
            env.append({"name": names.model, "value": served.model})
            secret = secret or served.auth_token_secret
        if secret is not None:
            ref = {"name": secret.name, "key": secret.key}
            env.append({"name": names.api_key, "valueFrom": {"secretKeyRef": ref}})
    return env


def hub_env(dataset: Dataset) -> list[dict[str, Any]]:
    """`HF_ENDPOINT` when the `hf` sources name a mirror; a pod has one, so they all must."""
    endpoints = {s.hf.endpoint for s in dataset.spec.sources if s.hf}
    if len(endpoints) > 1:
        named = sorted(e or "the Hugging Face Hub" for e in endpoints)
        raise ValueError(f"the hf sources of a Dataset read from one endpoint, got {named}")
    if not any(s.hf for s in dataset.spec.sources):
        return []
    # The Hub client's usage reports are not the pods' business (and fail offline).
    return [
        *({"name": "HF_ENDPOINT", "value": e} for e in endpoints if e),
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]


def tokenizer_model(dataset: Dataset) -> pretrained.ModelInput | None:
    """The initializer that fetches (or verifies) the tokenizer of `tokenizer.fromModel`, its
    volumes and the env that tells the engine where the files are; None without fromModel.
    Each pod fetches its own copy into its scratch space: tokenizer files are small."""
    model = dataset.spec.tokenizer.from_model
    if model is None:
        return None
    return pretrained.model_input(
        model,
        target=TOKENIZER_MODEL_DIR,
        shared=False,
        resources=dataset.spec.resources,
        extra_mounts=[],
        tokenizer_only=True,
    )


def _job(
    body: Mapping[str, Any],
    dataset: Dataset,
    stage: str,
    generation: int,
    completions: int,
    tokenizer_uri: str | None,
    deployments: Mapping[str, ServedModel] | None = None,
) -> dict[str, Any]:
    spec = dataset.spec
    name = dataset.metadata.name
    out_volumes, out_mounts = storage.mount("output", name, "data", spec.output, OUTPUT_DIR)
    scratch_volumes, scratch_mounts = pods.scratch_volumes()
    source_volumes, source_mounts = input_volumes(dataset)
    tokenizer_volumes: list[dict[str, Any]] = []
    tokenizer_mounts: list[dict[str, Any]] = []
    tokenizer_env: list[dict[str, Any]] = []
    if tokenizer_uri:  # reusing another Dataset's vocabulary
        tokenizer_volumes, tokenizer_mounts, path = storage.read_only_volume(
            "reference-tokenizer", tokenizer_uri, REFERENCE_TOKENIZER_DIR
        )
        tokenizer_env = [{"name": Env.REF_TOKENIZER, "value": path or tokenizer_uri}]
    model = tokenizer_model(dataset) if stage != "dedup" else None
    if model is not None:  # an open-weights model's tokenizer, fetched by the initializer
        tokenizer_volumes, tokenizer_mounts = model.volumes, model.mounts
        tokenizer_env = model.env
    output_dir = f"{OUTPUT_DIR}/{version(generation)}"
    env = [
        {"name": Env.OUTPUT_DIR, "value": output_dir},
        {"name": Env.WORK_DIR, "value": f"{output_dir}/.work"},
        {"name": Env.NUM_SLICES, "value": str(spec.parallelism)},
        {"name": Env.TERMINATION_LOG, "value": TERMINATION_MESSAGE},
        {"name": Env.VOLUMES_DIR, "value": VOLUMES_DIR},
        {"name": "HOME", "value": "/tmp"},
        *credentials_env(dataset),
        *hub_env(dataset),
        *tokenizer_env,
        *(llm_env(dataset, deployments) if stage == "slice" else []),
    ]
    role = f"{ROLES[stage]}-{version(generation)}"
    metadata = child_metadata(
        body,
        role,
        COMPONENT,
        **{GENERATION_LABEL: str(generation)},
        **pods.queue_labels(spec.scheduling),
    )
    job_spec: dict[str, Any] = {
        "completions": completions,
        "parallelism": completions,
        "template": {
            "metadata": {"labels": {**metadata["labels"], STAGE_LABEL: stage}},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": pods.pod_security_context(),
                "containers": [
                    {
                        "name": stage,
                        "image": pods.trainer_image(spec.resources),
                        "command": data_command(stage),
                        "env": env,
                        "resources": pods.container_resources(spec.resources),
                        "securityContext": pods.container_security_context(),
                        # The finalize step reports its statistics here for the Dataset status.
                        "terminationMessagePath": TERMINATION_MESSAGE,
                        "terminationMessagePolicy": "File",
                        "volumeMounts": [
                            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                            *scratch_mounts,
                            *out_mounts,
                            *source_mounts,
                            *tokenizer_mounts,
                        ],
                    }
                ],
                "volumes": [
                    {"name": "config", "configMap": {"name": child_name(name, CONFIG_ROLE)}},
                    *scratch_volumes,
                    *out_volumes,
                    *source_volumes,
                    *tokenizer_volumes,
                ],
                **pods.scheduling_fields(spec.scheduling),
            },
        },
    }
    if model is not None:
        job_spec["template"]["spec"]["initContainers"] = [model.init_container]
    if stage in INDEXED:  # a failed slice, group or tokenize pod is retried alone
        job_spec.update(
            completionMode="Indexed", backoffLimitPerIndex=RETRIES_PER_SLICE, maxFailedIndexes=0
        )
    else:
        job_spec["backoffLimit"] = RETRIES_PER_SLICE
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def slices_job(
    body: Mapping[str, Any],
    dataset: Dataset,
    generation: int,
    tokenizer_uri: str | None = None,
    deployments: Mapping[str, ServedModel] | None = None,
) -> dict[str, Any]:
    """`deployments`: the ModelDeployments the spec's language models name, resolved."""
    return _job(
        body, dataset, "slice", generation, dataset.spec.parallelism, tokenizer_uri, deployments
    )


def dedup_job(body: Mapping[str, Any], dataset: Dataset, generation: int) -> dict[str, Any]:
    """One pod per group of LSH bands (`dedup_groups`); they need no tokenizer."""
    return _job(body, dataset, "dedup", generation, dedup_groups(dataset.spec), None)


def prepare_job(
    body: Mapping[str, Any], dataset: Dataset, generation: int, tokenizer_uri: str | None = None
) -> dict[str, Any]:
    """`tokenizer_uri`: the referenced Dataset's tokenizer, when the spec reuses one."""
    return _job(body, dataset, "prepare", generation, 1, tokenizer_uri)


def tokenize_job(
    body: Mapping[str, Any], dataset: Dataset, generation: int, tokenizer_uri: str | None = None
) -> dict[str, Any]:
    """One pod per slice; pod `p` tokenizes the units `u % parallelism == p`."""
    return _job(body, dataset, "tokenize", generation, dataset.spec.parallelism, tokenizer_uri)


def finalize_job(
    body: Mapping[str, Any], dataset: Dataset, generation: int, tokenizer_uri: str | None = None
) -> dict[str, Any]:
    return _job(body, dataset, "finalize", generation, 1, tokenizer_uri)


def stage_jobs(
    body: Mapping[str, Any],
    dataset: Dataset,
    generation: int,
    tokenizer_uri: str | None = None,
    deployments: Mapping[str, ServedModel] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """(stage, Job) of every stage of a version, in the order they run (DATA_STAGES)."""
    jobs = {
        "slice": slices_job(body, dataset, generation, tokenizer_uri, deployments),
        "dedup": dedup_job(body, dataset, generation),
        "prepare": prepare_job(body, dataset, generation, tokenizer_uri),
        "tokenize": tokenize_job(body, dataset, generation, tokenizer_uri),
        "finalize": finalize_job(body, dataset, generation, tokenizer_uri),
    }
    return [(stage, jobs[stage]) for stage in DATA_STAGES]
