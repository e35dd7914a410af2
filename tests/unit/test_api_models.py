"""The API models: examples parse, defaults apply, and every rule rejects what the API
server rejects (the invalid corpus of the cluster tier), so the local runtime and the trainer
refuse the same input as admission does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from llmops.api import KINDS, DatasetSpec, ModelDeploymentSpec, TrainingRun, TrainingRunSpec
from llmops.api.ds_overlay import OWNED
from llmops.api.trainingrun import DeepSpeed
from llmops.manifests import load_manifests
from llmops_trainer.data.collect import list_inputs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((ROOT / "tests" / "cluster" / "invalid").glob("*.yaml"))


def _expected_field(path: Path) -> str:
    found = re.search(r"^# expect: (.+)$", path.read_text(), re.MULTILINE)
    assert found, path.name
    return found.group(1)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse_and_round_trip(example: Path) -> None:
    for doc in load_manifests([example]):
        model = KINDS[doc["kind"]].model_validate(doc)
        again = KINDS[doc["kind"]].model_validate(model.to_dict())
        assert again == model


def test_quickstart_is_small_enough_for_a_cpu() -> None:
    docs = {
        d["kind"]: KINDS[d["kind"]].model_validate(d)
        for d in load_manifests([ROOT / "examples/quickstart.yaml"])
    }
    run = docs["TrainingRun"]
    assert isinstance(run, TrainingRun)
    assert run.spec.resources.gpus_per_node == 0
    assert run.spec.hyperparameters.max_steps is not None
    assert run.spec.hyperparameters.max_steps <= 2000
    assert run.spec.model.hidden_size <= 128
    dataset = docs["Dataset"]
    source = dataset.spec.sources[0]  # type: ignore[union-attr]
    # Text every machine with Python has: the standard library, found at run time.
    assert source.path == "$(PYTHON_STDLIB)"
    assert len(list_inputs(dataset.spec)) > 100  # type: ignore[union-attr]
    assert run.spec.dataset_ref.name == dataset.metadata.name
    assert docs["ModelDeployment"].spec.model.training_run.name == run.metadata.name  # type: ignore[union-attr]


def test_defaults() -> None:
    spec = TrainingRunSpec.model_validate(
        {"datasetRef": {"name": "corpus"}, "hyperparameters": {"maxSteps": 10}}
    )
    assert spec.model.objective == "causal-lm"
    assert spec.deepspeed.zero_stage == 1
    assert spec.deepspeed.precision == "bf16"
    assert spec.resources.num_nodes == 1
    assert spec.evaluation.metrics == ["perplexity"]
    assert spec.checkpointing.keep_last == 3
    assert spec.max_restarts == 3
    assert spec.suspend is False
    md = ModelDeploymentSpec.model_validate({"model": {"uri": "s3://models/gpt"}})
    assert md.replicas == 1
    assert md.server.max_concurrency == 64
    ds = DatasetSpec.model_validate(
        {"sources": [{"name": "a", "path": "a.txt"}], "tokenizer": {"train": {}}}
    )
    assert ds.processing.deduplication.near.num_permutations == 128
    assert ds.tokenizer.train is not None and ds.tokenizer.train.vocab_size == 8192
    assert ds.split.train + ds.split.validation + ds.split.test == pytest.approx(1)


def test_snake_case_and_camel_case_both_populate() -> None:
    by_alias = TrainingRunSpec.model_validate(
        {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 5, "learningRate": 0.01}}
    )
    by_name = TrainingRunSpec(
        dataset_ref={"name": "c"},  # type: ignore[arg-type]
        hyperparameters={"max_steps": 5, "learning_rate": 0.01},  # type: ignore[arg-type]
    )
    assert by_alias == by_name
    wire = by_alias.to_dict()
    assert wire["hyperparameters"]["learningRate"] == 0.01
    assert "learning_rate" not in wire["hyperparameters"]


def test_quantities_accept_integers_and_suffixes() -> None:
    spec = TrainingRunSpec.model_validate(
        {
            "datasetRef": {"name": "c"},
            "hyperparameters": {"maxSteps": 5},
            "resources": {"cpu": 4, "memory": "16Gi"},
        }
    )
    assert spec.resources.cpu == "4"
    assert spec.resources.memory == "16Gi"


def test_global_batch_size_rule() -> None:
    base: dict[str, Any] = {
        "datasetRef": {"name": "c"},
        "resources": {"numNodes": 2, "procsPerNode": 4},
    }
    ok = {"maxSteps": 5, "microBatchSize": 8, "globalBatchSize": 128}  # 8 x 8 x 2
    TrainingRunSpec.model_validate({**base, "hyperparameters": ok})
    TrainingRunSpec.model_validate(
        {**base, "hyperparameters": {**ok, "gradientAccumulationSteps": 2}}
    )
    with pytest.raises(ValidationError, match="globalBatchSize"):
        TrainingRunSpec.model_validate({**base, "hyperparameters": {**ok, "globalBatchSize": 96}})
    with pytest.raises(ValidationError, match="globalBatchSize"):
        TrainingRunSpec.model_validate(
            {**base, "hyperparameters": {**ok, "gradientAccumulationSteps": 3}}
        )


@pytest.mark.parametrize(
    ("resources", "processes"),
    [({}, 1), ({"gpusPerNode": 4}, 4), ({"procsPerNode": 2}, 2), ({"numNodes": 2}, 1)],
)
def test_processes_per_node_unset_means_one_per_gpu_or_one(
    resources: dict[str, int], processes: int
) -> None:
    """The batch rule counts what unset means: 8 x 4 GPUs is 32 per step, so 48 is refused."""
    base: dict[str, Any] = {"datasetRef": {"name": "c"}, "resources": resources}
    spec = TrainingRunSpec.model_validate({**base, "hyperparameters": {"maxSteps": 5}})
    assert spec.resources.processes_per_node == processes
    world = processes * resources.get("numNodes", 1)
    batch = {"maxSteps": 5, "microBatchSize": 8, "globalBatchSize": 8 * world * 3}
    TrainingRunSpec.model_validate({**base, "hyperparameters": batch})
    if world > 1:
        with pytest.raises(ValidationError, match="globalBatchSize"):
            TrainingRunSpec.model_validate(
                {**base, "hyperparameters": {**batch, "globalBatchSize": 8 * world + 8}}
            )


@pytest.mark.parametrize("key", list(OWNED))
def test_overlay_keys_owned_by_typed_fields_are_refused(key: str) -> None:
    """Every refused key, nested as DeepSpeed nests it, fails naming its path; the CRD carries
    the same refusal as a CEL rule reported at that path."""
    overlay: dict[str, Any] = {"kept": 1}
    node = overlay
    *sections, leaf = key.split(".")
    for section in sections:
        node = node.setdefault(section, {"tuned": 1})
    node[leaf] = {} if OWNED[key][1] == "object" else 1
    spec = {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 5}}
    with pytest.raises(ValidationError, match=rf"config\.{re.escape(key)}: set by"):
        TrainingRunSpec.model_validate({**spec, "deepspeed": {"config": overlay}})
    (rule,) = [r for r in DeepSpeed.cel_rules if r.field_path == f".config.{key}"]
    assert rule.cel.startswith("!has(self.config) || ")
    assert rule.cel.endswith(f"!has(self.config.{key})")


def test_overlay_may_tune_what_typed_fields_leave_open() -> None:
    overlay = {
        "zero_optimization": {"overlap_comm": True, "offload_optimizer": {"pin_memory": False}},
        "optimizer": {"params": {"betas": [0.9, 0.99]}},
        "fp16": {"initial_scale_power": 12},
        "activation_checkpointing": {"partition_activations": True},
    }
    spec = TrainingRunSpec.model_validate(
        {
            "datasetRef": {"name": "c"},
            "hyperparameters": {"maxSteps": 5},
            "deepspeed": {"config": overlay},
        }
    )
    assert spec.deepspeed.config == overlay


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="learningrate"):
        TrainingRunSpec.model_validate(
            {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 5, "learningrate": 1}}
        )


def test_status_ignores_fields_it_does_not_know() -> None:
    run = TrainingRun.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "r", "resourceVersion": "7"},
            "spec": {"datasetRef": {"name": "c"}, "hyperparameters": {"maxSteps": 5}},
            "status": {"phase": "Running", "step": 3, "somethingNew": True},
        }
    )
    assert run.status.step == 3


def test_invalid_corpus_is_large() -> None:
    assert len(INVALID) >= 30


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_by_the_models(path: Path) -> None:
    """Each manifest the API server rejects is rejected here too, naming the same field."""
    doc = yaml.safe_load(path.read_text())
    with pytest.raises(ValidationError) as raised:
        KINDS[doc["kind"]].model_validate(doc)
    # The last named segment of the server's field path ("spec.sources[0].weight" -> weight).
    field = re.sub(r"\[\d+\]", "", _expected_field(path)).split(".")[-1]
    assert field in str(raised.value)


def test_api_imports_nothing_heavy() -> None:
    """The trainer image imports llmops.api: no kopf, no Kubernetes client, no torch."""
    code = (
        "import sys, llmops.api; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes', 'torch')]; "
        "print(heavy); sys.exit(bool(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
