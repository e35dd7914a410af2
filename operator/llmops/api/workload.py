"""The contract between the operator and its workload pods, declared once.

Everything that crosses from the operator (builders, controllers, the local runtime) to the
data, training and serving pods and back is named here: the commands that start the pods,
the environment variables and mount paths both sides read, the label and annotation keys,
the records the workloads write (progress line, termination reports, evaluation report) and
the serving metric names the autoscalers and dashboards query. The workload writes a record
with the same model the operator reads it with, so a field cannot be produced under one
name and looked for under another.

Torch-free and free of Kubernetes clients: the operator image, the trainer image and the
tests import it alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict, Field, ValidationError

from llmops import GROUP
from llmops.api.base import StatusModel
from llmops.api.dataset import StepStats, TokenCounts
from llmops.api.trainingrun import (
    BenchmarkScore,
    EvaluatedSplit,
    FinalEvaluation,
    TrainingRunSpec,
)

# -- entrypoints -----------------------------------------------------------------------------

TRAINER_MODULE = "llmops_trainer.train"
DATA_MODULE = "llmops_trainer.data"
SERVER_MODULE = "llmops_trainer.serve"
MODEL_INIT_MODULE = "llmops_trainer.model_init"  # fetches and verifies a pretrained model

# -- ports -----------------------------------------------------------------------------------

RENDEZVOUS_PORT = 29500  # torchrun's default master port
METRICS_PORT = 9400  # the trainer's Prometheus endpoint

# -- mount paths inside the pods -------------------------------------------------------------

CONFIG_DIR = "/etc/llmops"  # the resource itself as JSON (ConfigMap `<name>-config`)
TRAINING_CONFIG_FILE = "trainingrun.json"
DATASET_CONFIG_FILE = "dataset.json"
SERVING_CONFIG_FILE = "modeldeployment.json"
DATA_DIR = "/data"  # a prepared Dataset, read by the trainer
INIT_DIR = "/init"  # weights to start from
CHECKPOINT_DIR = "/checkpoints"
OUTPUT_SUBDIR = "output"  # under the checkpoint folder: progress, reports, card, model/
FINAL_MODEL_SUBDIR = "model"  # under the output folder: the exported model
ADAPTER_SUBDIR = "adapter"  # under the output folder: a LoRA run's adapter (peft layout)
PRETRAINED_SUBDIR = "pretrained"  # under the checkpoint folder: a fetched pretrained model
PRETRAINED_MOUNT_DIR = "/pretrained"  # a pretrained model on a volume, mounted read-only
TOKENIZER_MODEL_DIR = "/tmp/llmops-tokenizer-model"  # a data pod's fetched model tokenizer
DATASET_OUTPUT_DIR = "/output"  # a Dataset's volume, one folder per version
DATASET_VOLUMES_DIR = "/mnt/llmops/volumes"  # a Dataset's source volumes, one per claim
REFERENCE_TOKENIZER_DIR = "/mnt/llmops/reference"  # another Dataset's tokenizer
MODEL_DIR = "/model"  # the served model
ADAPTERS_DIR = "/adapters"  # its LoRA adapters' volumes, one folder per source
ADAPTERS_CONFIG_DIR = "/var/run/llmops/adapters"  # which adapter folders to serve (ConfigMap)
ADAPTERS_FILE = "adapters.json"  # in ADAPTERS_CONFIG_DIR: a JSON list of AdapterEntry
AUTH_DIR = "/var/run/llmops/auth"  # the served API's bearer token, as a file
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes keeps 4096 bytes of it
BENCHMARKS_DIR = "/mnt/llmops/benchmarks"  # benchmark task folders (claims, ConfigMaps)


class Env:
    """Environment variables the builders set and the workloads read."""

    # every workload
    OUTPUT_DIR = "LLMOPS_OUTPUT_DIR"
    TERMINATION_LOG = "LLMOPS_TERMINATION_LOG"
    LOG_LEVEL = "LLMOPS_LOG_LEVEL"
    # data pods
    WORK_DIR = "LLMOPS_WORK_DIR"
    NUM_SLICES = "LLMOPS_NUM_SLICES"
    VOLUMES_DIR = "LLMOPS_VOLUMES_DIR"
    REF_TOKENIZER = "LLMOPS_REF_TOKENIZER"
    # Where the answers of language models are cached (content hash -> answer): a folder on
    # the output volume every version and slice shares.
    LLM_CACHE_DIR = "LLMOPS_LLM_CACHE_DIR"
    # training pods
    DATA_DIR = "LLMOPS_DATA_DIR"
    DATA_URI = "LLMOPS_DATA_URI"
    CHECKPOINT_DIR = "LLMOPS_CHECKPOINT_DIR"
    INIT_CHECKPOINT = "LLMOPS_INIT_CHECKPOINT"
    ATTEMPT = "LLMOPS_ATTEMPT"
    METRICS_PORT = "LLMOPS_METRICS_PORT"
    LOG_INTERVAL = "LLMOPS_LOG_INTERVAL"
    SAMPLE_LOG = "LLMOPS_SAMPLE_LOG"
    PEAK_FLOPS = "LLMOPS_PEAK_FLOPS"
    # Benchmark i's task folder inside the pod (or its s3:// URI): BENCHMARK_TASKS + str(i);
    # an s3:// folder's endpoint and credentials likewise (BENCHMARK_S3_* + str(i)).
    BENCHMARK_TASKS = "LLMOPS_BENCHMARK_TASKS_"
    BENCHMARK_S3_ENDPOINT = "LLMOPS_BENCHMARK_S3_ENDPOINT_"
    BENCHMARK_S3_ACCESS_KEY = "LLMOPS_BENCHMARK_S3_ACCESS_KEY_ID_"
    BENCHMARK_S3_SECRET_KEY = "LLMOPS_BENCHMARK_S3_SECRET_ACCESS_KEY_"
    # model initializer (init container) and trainer: a pretrained model
    PRETRAINED_URI = "LLMOPS_PRETRAINED_URI"  # where it comes from (PretrainedModel.uri)
    PRETRAINED_FILES = "LLMOPS_PRETRAINED_FILES"  # https: JSON list of {name, sha256}
    PRETRAINED_DIR = "LLMOPS_PRETRAINED_DIR"  # the verified local folder the trainer loads
    # "1": the folder is on a volume every pod of the gang sees; pod 0 downloads, others wait
    PRETRAINED_SHARED = "LLMOPS_PRETRAINED_SHARED"
    # serving pods
    MODEL_DIR = "LLMOPS_MODEL_DIR"
    AUTH_TOKEN_FILE = "LLMOPS_AUTH_TOKEN_FILE"
    TOKENIZER_PATH = "LLMOPS_TOKENIZER_PATH"
    # LoRA adapters served by name: a JSON file of AdapterEntry records (a mounted
    # ConfigMap, so a new version reaches a running server without a restart)
    ADAPTERS_FILE = "LLMOPS_ADAPTERS_FILE"
    # how often the server looks at that file for new adapters or versions (seconds)
    ADAPTERS_POLL_SECONDS = "LLMOPS_ADAPTERS_POLL_SECONDS"


# -- labels and annotations ------------------------------------------------------------------

OWNER_LABELS = {
    "Dataset": f"{GROUP}/dataset",
    "TrainingRun": f"{GROUP}/training-run",
    "ModelDeployment": f"{GROUP}/model-deployment",
    "TrainingSchedule": f"{GROUP}/training-schedule",
    "Sweep": f"{GROUP}/sweep",
}
ROLE_LABEL = f"{GROUP}/role"
GENERATION_LABEL = f"{GROUP}/generation"  # the Dataset version a data Job processes
STAGE_LABEL = f"{GROUP}/stage"  # dataset.DATA_STAGES: slice, dedup, ..., finalize
MODEL_URI_ANNOTATION = f"{GROUP}/model-uri"  # the model a serving pod template loads
SPEC_HASH_ANNOTATION = f"{GROUP}/spec-hash"  # the local runtime's record of a spec
LICENSE_ANNOTATION = f"{GROUP}/license"  # a Dataset's license (`.<source>` for one source)
WORKER_ROLE = "worker"
SERVER_ROLE = "server"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# -- serving metrics -------------------------------------------------------------------------


class ServingMetric:
    """Metric names of the inference server (vLLM's meanings, `llmops_serving_` prefix)."""

    PREFIX = "llmops_serving_"
    REQUESTS_RUNNING = PREFIX + "requests_running"
    REQUESTS_WAITING = PREFIX + "requests_waiting"
    TIME_TO_FIRST_TOKEN = PREFIX + "time_to_first_token_seconds"
    INTER_TOKEN_LATENCY = PREFIX + "inter_token_latency_seconds"
    E2E_LATENCY = PREFIX + "e2e_request_latency_seconds"
    BATCH_SIZE = PREFIX + "batch_size"
    PROMPT_TOKENS = PREFIX + "prompt_tokens"  # a counter: exposed with `_total`
    GENERATION_TOKENS = PREFIX + "generation_tokens"  # a counter: exposed with `_total`
    # The per-second rate of GENERATION_TOKENS per pod, as prometheus-adapter serves it to
    # the HPA (helm/llmops/prometheus-adapter-values.yaml).
    GENERATION_TOKENS_PER_SECOND = PREFIX + "generation_tokens_per_second"
    # Every series also carries `model_name` (the served name), as vLLM's do.
    KV_CACHE_USAGE = PREFIX + "kv_cache_usage_ratio"  # 0-1, as vLLM's kv_cache_usage_perc
    QUEUE_TIME = PREFIX + "request_queue_time_seconds"
    REQUEST_PROMPT_TOKENS = PREFIX + "request_prompt_tokens"  # a histogram per request
    REQUEST_GENERATION_TOKENS = PREFIX + "request_generation_tokens"  # a histogram per request
    REQUESTS = PREFIX + "requests"  # a counter (`_total`) of finished ones, by finish_reason
    REQUESTS_REJECTED = PREFIX + "requests_rejected"  # a counter (`_total`), by reason
    HTTP_REQUESTS = PREFIX + "http_requests"  # a counter (`_total`), by path, method, status
    MODEL_INFO = PREFIX + "model_info"
    ADAPTER_LOADS = PREFIX + "adapter_loads"  # a counter (`_total`), by outcome


# -- commands --------------------------------------------------------------------------------


def env_ref(name: str) -> str:
    """Kubernetes expands `$(NAME)` in a container's command from the container's env."""
    return f"$({name})"


def torchrun_command(
    spec: TrainingRunSpec,
    config_path: str = f"{CONFIG_DIR}/{TRAINING_CONFIG_FILE}",
    *,
    node_rank: int | str = env_ref("NODE_RANK"),
    master_addr: str = env_ref("MASTER_ADDR"),
    master_port: int | str = env_ref("MASTER_PORT"),
    launcher: Sequence[str] = ("torchrun",),
) -> list[str]:
    """argv of one training pod's launcher.

    The gang's shape comes from the spec; the pod's rank and the rendezvous address default
    to `$(VAR)` references that Kubernetes fills in from the pod's env (the Indexed Job's
    completion index and the first pod's stable DNS name), and the local runtime passes
    values. `--max-restarts=0`: a failed process fails the pod, and the controller restarts
    the whole gang from the last checkpoint.
    """
    resources = spec.resources
    return [
        *launcher,
        f"--nnodes={resources.num_nodes}",
        f"--nproc-per-node={resources.processes_per_node}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "--max-restarts=0",
        "-m",
        TRAINER_MODULE,
        "--config",
        config_path,
    ]


def trainer_env(spec: TrainingRunSpec) -> dict[str, str]:
    """Environment the trainer needs besides the paths and rendezvous variables."""
    env = {"PYTHONUNBUFFERED": "1", Env.METRICS_PORT: str(METRICS_PORT)}
    if spec.resources.gpus_per_node == 0:
        # DeepSpeed on CPUs: its CPU accelerator, gloo for collectives.
        env["DS_ACCELERATOR"] = "cpu"
    if spec.evaluation.benchmarks:
        # lm-evaluation-harness reads task data from the tasks folder: never the Hub.
        env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    return env


@dataclass(frozen=True)
class LlmEndpointEnv:
    """The variables that tell a data pod where language model number `index` of
    `DatasetSpec.llm_endpoints()` is: its base URL and served model name when the operator
    resolved a ModelDeployment (a `url` endpoint needs neither), its API key (a secretKeyRef)."""

    url: str
    model: str
    api_key: str


def llm_endpoint_env(index: int) -> LlmEndpointEnv:
    prefix = f"LLMOPS_LLM_{index}_"
    return LlmEndpointEnv(f"{prefix}URL", f"{prefix}MODEL", f"{prefix}API_KEY")


# Why a data slice failed on a language model: the Dataset's Failed condition carries it, with
# the endpoint and the HTTP status code in the message.
LLM_ENDPOINT_FAILED = "EndpointFailed"


def data_command(stage: str) -> list[str]:
    """argv of a data pod; `stage` is one of dataset.DATA_STAGES."""
    return [
        "python",
        "-m",
        DATA_MODULE,
        "--config",
        f"{CONFIG_DIR}/{DATASET_CONFIG_FILE}",
        "--stage",
        stage,
    ]


def model_init_command(*, tokenizer_only: bool = False, any_model: bool = False) -> list[str]:
    """argv of the initializer that fetches `Env.PRETRAINED_URI` into `Env.PRETRAINED_DIR`
    (or verifies it in place) before the workload starts. `any_model`: a served model, which
    may be an llmops checkpoint rather than a Hugging Face folder."""
    command = ["python", "-m", MODEL_INIT_MODULE]
    if tokenizer_only:
        command.append("--tokenizer-only")
    if any_model:
        command.append("--any-model")
    return command


def server_command() -> list[str]:
    return ["python", "-m", SERVER_MODULE, "--config", f"{CONFIG_DIR}/{SERVING_CONFIG_FILE}"]


# -- records the workloads write -------------------------------------------------------------


class Record(StatusModel):
    """A document a workload writes and the operator reads. Unknown keys are ignored on
    reading, so a newer workload can add fields without breaking an older operator."""

    model_config = ConfigDict(extra="ignore", strict=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


class AdapterEntry(Record):
    """One LoRA adapter a server is to serve: a line of ADAPTERS_FILE."""

    name: str = Field(description="The model name requests use for it.")
    path: str = Field(description="Its folder (peft layout) inside the server's container.")
    source: str | None = Field(
        default=None, description="Where it comes from, as the status shows it (run/step)."
    )


def read_adapter_entries(text: str) -> list[AdapterEntry]:
    """The entries of an adapters file; raises ValueError when it is not a list of them."""
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("the adapters file must hold a JSON list")
    return [AdapterEntry.model_validate(item) for item in data]


TrainingPhase = Literal["Starting", "Training", "Evaluating", "Completed", "Interrupted", "Failed"]


class ValidationScores(Record):
    """One evaluation on the validation split."""

    loss: float = Field(description="Mean token loss.")
    perplexity: float | None = Field(default=None, description="exp(loss), causal models.")
    accuracy: float | None = Field(default=None, description="Next-token accuracy.")
    bleu: float | None = Field(default=None, description="BLEU of generated responses (sft).")
    loss_text: float | None = Field(
        default=None, description="Mean loss of the plain-text tokens (a mixed Dataset)."
    )
    loss_supervised: float | None = Field(
        default=None,
        description="Mean loss of the supervised records' learned tokens (a mixed Dataset).",
    )


class TrainingProgress(Record):
    """Rank 0's progress: `progress.json` in the output folder, and the same document as a
    log line prefixed with PROGRESS_LOG_PREFIX."""

    phase: TrainingPhase = Field(description="What the trainer is doing.")
    step: int = Field(default=0, description="Optimizer steps done.", ge=0)
    total_steps: int = Field(default=0, description="Optimizer steps planned.", ge=0)
    epoch: float | None = Field(default=None, description="Passes over the training split.")
    train_loss: float | None = Field(default=None, description="Loss of the latest step.")
    train_loss_text: float | None = Field(
        default=None,
        description="Mixed Dataset: mean loss of the latest step's plain-text tokens.",
    )
    train_loss_supervised: float | None = Field(
        default=None,
        description="Mixed Dataset: mean loss of the latest step's supervised-record tokens.",
    )
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    grad_norm: float | None = Field(default=None, description="Global gradient norm.")
    tokens_per_second: float | None = Field(default=None, description="Throughput.")
    mfu: float | None = Field(default=None, description="Model FLOPs utilization, 0-1.")
    validation: ValidationScores | None = Field(
        default=None, description="The latest validation scores."
    )
    latest_checkpoint: str | None = Field(default=None, description="Newest checkpoint.")
    latest_checkpoint_validation_loss: float | None = Field(
        default=None, description="Validation loss at the newest checkpoint's step."
    )
    best_checkpoint: str | None = Field(default=None, description="Lowest validation loss.")
    best_checkpoint_validation_loss: float | None = Field(
        default=None, description="Validation loss at the best checkpoint's step."
    )


class MetricsEntry(Record):
    """One line of METRICS_HISTORY_FILE: a logged training step's figures, or an evaluation's
    scores at that step (the trainer writes both kinds; the local runtime plots them)."""

    step: int = Field(description="Optimizer steps done.", ge=0)
    train_loss: float | None = Field(default=None, description="Loss of the step.")
    train_loss_text: float | None = Field(
        default=None, description="Mixed Dataset: mean loss of the step's plain-text tokens."
    )
    train_loss_supervised: float | None = Field(
        default=None,
        description="Mixed Dataset: mean loss of the step's learned supervised-record tokens.",
    )
    learning_rate: float | None = Field(default=None, description="Learning rate of the step.")
    grad_norm: float | None = Field(default=None, description="Global gradient norm.")
    tokens_per_second: float | None = Field(default=None, description="Throughput.")
    mfu: float | None = Field(default=None, description="Model FLOPs utilization, 0-1.")
    val_loss: float | None = Field(default=None, description="Validation loss.")
    val_loss_text: float | None = Field(
        default=None, description="Mixed Dataset: validation loss of the plain-text tokens."
    )
    val_loss_supervised: float | None = Field(
        default=None, description="Mixed Dataset: validation loss of the supervised records."
    )
    perplexity: float | None = Field(default=None, description="Validation perplexity.")
    accuracy: float | None = Field(default=None, description="Validation next-token accuracy.")
    bleu: float | None = Field(default=None, description="BLEU of generated responses.")
    train_split_loss: float | None = Field(
        default=None, description="Loss on a sample of the training split (overfitting check)."
    )


def read_metrics_history(text: str) -> list[MetricsEntry]:
    """The entries of a metrics history; a line cut short (a killed writer) is skipped."""
    entries = []
    for line in text.splitlines():
        entry = read_record(MetricsEntry, line)
        if entry is not None:
            entries.append(entry)
    return entries


PROGRESS_FILE = "progress.json"
PROGRESS_LOG_PREFIX = "LLMOPS_PROGRESS "


def progress_log_line(progress: TrainingProgress) -> str:
    return PROGRESS_LOG_PREFIX + progress.to_json()


def parse_progress_line(line: str) -> TrainingProgress | None:
    """The progress record of a log line; None for any other line or one cut short."""
    if not line.startswith(PROGRESS_LOG_PREFIX):
        return None
    try:
        return TrainingProgress.model_validate_json(line[len(PROGRESS_LOG_PREFIX) :])
    except ValidationError:
        return None


def last_progress(log: str | None) -> TrainingProgress | None:
    """The last progress record in a log."""
    for line in reversed((log or "").splitlines()):
        record = parse_progress_line(line)
        if record is not None:
            return record
    return None


class TrainerReport(Record):
    """Rank 0's termination message after training finished (the TrainingRun status)."""

    step: int = Field(description="Optimizer steps done.", ge=0)
    final_evaluation: FinalEvaluation | None = Field(
        default=None, description="Scores on the test split (validation when there is none)."
    )
    latest_checkpoint: str | None = Field(default=None, description="Newest checkpoint.")
    latest_checkpoint_validation_loss: float | None = Field(default=None)
    best_checkpoint: str | None = Field(default=None, description="Lowest validation loss.")
    best_checkpoint_validation_loss: float | None = Field(default=None)


class FinalReport(Record):
    """The `final` part of eval_report.json: the evaluation after training."""

    stop_reason: str = Field(description="Completed, EarlyStopped.")
    steps: int = Field(description="Optimizer steps done.", ge=0)
    split: EvaluatedSplit | None = None  # what was evaluated (a fold: `fold-<i>/<k>`)
    loss: float | None = None
    perplexity: float | None = None
    accuracy: float | None = None
    bleu: float | None = None
    bleu_task: Literal["responses", "continuation"] | None = None
    unigram_perplexity: float | None = None
    validation_perplexity: float | None = None
    validation_unigram_perplexity: float | None = None
    tokens_seen: int | None = None
    # spec.evaluation.benchmarks' scores (lm-evaluation-harness), in the spec's order
    benchmarks: list[BenchmarkScore] | None = None

    def evaluation(self) -> FinalEvaluation:
        return FinalEvaluation(
            split=self.split,
            loss=self.loss,
            perplexity=self.perplexity,
            accuracy=self.accuracy,
            bleu=self.bleu,
            benchmarks=self.benchmarks,
        )


class BenchmarkResult(Record):
    """One benchmark in eval_report.json: every metric of every task it ran (a group runs
    several), beside the score that status reports."""

    name: str
    score: BenchmarkScore
    num_fewshot: int | None = None
    limit: int | None = None
    # task -> metric -> value (stderr as `<metric>_stderr`); lm-eval's `acc,none` keys
    # without the filter suffix when it is `none`
    tasks: dict[str, dict[str, float]] = Field(default_factory=dict)
    samples: dict[str, int] = Field(default_factory=dict, description="Documents per task.")


class EvaluationReport(Record):
    """eval_report.json in the output folder (read by the local runtime and the model card)."""

    final: FinalReport
    worst_passages: list[dict[str, Any]] = Field(default_factory=list)
    generation_examples: list[dict[str, str]] = Field(default_factory=list)
    benchmarks: list[BenchmarkResult] = Field(default_factory=list)
    best_checkpoint: str | None = None
    latest_checkpoint: str | None = None


EVALUATION_REPORT_FILE = "eval_report.json"
METRICS_HISTORY_FILE = "metrics.jsonl"  # one TrainingProgress-shaped line per log/eval
MODEL_CARD_FILE = "model_card.md"


class DataMergeReport(Record):
    """The finalize pod's termination message: the Dataset status fields of its statistics."""

    documents: int | None = None
    tokens: TokenCounts | None = None
    total_tokens: int | None = None
    exact_duplicate_ratio: float | None = None
    near_duplicate_ratio: float | None = None
    vocab_size: int | None = None
    synthetic_documents: int | None = None
    fingerprint: str | None = None
    steps: list[StepStats] = Field(default_factory=list)
    languages: dict[str, float] = Field(default_factory=dict, description="The ten most common.")

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> DataMergeReport:
        """Small enough for a termination message: per-step counts without the drop
        reasons, the ten most frequent languages."""
        languages = sorted(stats.get("languages", {}).items(), key=lambda kv: -kv[1])[:10]
        return cls.model_validate({**stats, "languages": dict(languages)})


class FailureReport(Record):
    """A workload pod's termination message when it failed: which stage, why. The model
    initializer uses stage `model-init` and one of MODEL_INIT_REASONS."""

    stage: str
    reason: str
    message: str = ""


# Why a model initializer failed: the condition reason the TrainingRun or Dataset shows.
MODEL_INIT_STAGE = "model-init"
MODEL_INIT_REASONS = (
    "ModelNotFound",  # nothing at the URI (or no access to it)
    "MissingModelConfig",  # no config.json
    "UnknownArchitecture",  # config.json names an architecture transformers does not know
    "MissingTokenizer",  # no tokenizer.json / tokenizer_config.json
    "MissingWeights",  # no *.safetensors / *.bin
    "ChecksumMismatch",  # an https file's SHA-256 differs from the spec
    "ModelFetchFailed",  # the download failed (network, credentials, storage)
)


# A trainer that fails where a restart would fail the same way (its set-up refuses the spec or
# the data, or the final evaluation or export breaks after training) says so with stage
# `train` and one of these reasons; the run then fails at once instead of spending restarts.
# Anything else (a crash mid-training, a lost peer, an OOM kill) stays a reason to restart.
TRAINER_STAGE = "train"
TRAINER_PERMANENT_REASONS = ("InvalidTrainingSetup", "FinalEvaluationFailed")


# A server that cannot start (or stops serving) says why with stage `serve` and one of these
# reasons; the ModelDeployment's Degraded condition carries it. A container that died without
# a report (vLLM, an OOM kill) shows the end of its log instead, as `ServerCrashed`.
SERVER_STAGE = "serve"
SERVER_REASONS = (
    "EmptyAuthToken",  # the token Secret's value is empty: refusing to serve without auth
    "ModelLoadFailed",  # the model folder is missing, incomplete or unreadable
    "UnsupportedModel",  # an architecture the built-in engine does not serve (runtime vllm)
    "InvalidAdapter",  # a LoRA adapter that does not fit the base model
    "InvalidServingConfig",  # settings the model cannot honour (e.g. contextLength)
    "ServerFailed",  # anything else that stopped the server
)
SERVER_CRASHED = "ServerCrashed"


R = TypeVar("R", bound=Record)


def read_record(model: type[R], text: str | None) -> R | None:
    """A record from a termination message or file; None when absent or not this record."""
    if not text:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError:
        return None


# -- vLLM's metrics (runtime vllm) -----------------------------------------------------------


class VllmMetric:
    """Metric names vLLM's OpenAI-compatible server exports (runtime vllm; checked against
    the pinned vLLM release by tests/unit/test_vllm.py): ServingMetric's meanings under vLLM's
    own names. The autoscalers read them from here."""

    PREFIX = "vllm:"
    REQUESTS_RUNNING = PREFIX + "num_requests_running"
    REQUESTS_WAITING = PREFIX + "num_requests_waiting"
    TIME_TO_FIRST_TOKEN = PREFIX + "time_to_first_token_seconds"
    INTER_TOKEN_LATENCY = PREFIX + "inter_token_latency_seconds"
    E2E_LATENCY = PREFIX + "e2e_request_latency_seconds"
    KV_CACHE_USAGE = PREFIX + "kv_cache_usage_perc"  # 0-1 (`gpu_cache_usage_perc` formerly)
    PROMPT_TOKENS = PREFIX + "prompt_tokens"  # a counter: exposed with `_total`
    GENERATION_TOKENS = PREFIX + "generation_tokens"  # a counter: exposed with `_total`
    REQUEST_SUCCESS = PREFIX + "request_success"  # a counter (`_total`), by finished_reason
    # The names prometheus-adapter serves them under to the HPA (custom metrics API names
    # without the colon; helm/llmops/prometheus-adapter-values.yaml): the gauges as they are,
    # the token counter as its per-second rate.
    HPA_REQUESTS_RUNNING = "vllm_num_requests_running"
    HPA_REQUESTS_WAITING = "vllm_num_requests_waiting"
    HPA_GENERATION_TOKENS_PER_SECOND = "vllm_generation_tokens_per_second"
