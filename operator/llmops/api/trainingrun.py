"""TrainingRun: pre-train or fine-tune a model with DeepSpeed ZeRO on a gang of pods."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints

from llmops.api import ds_overlay
from llmops.api.base import (
    ApiModel,
    Rule,
    StatusModel,
    cel_exactly_one,
    distinct,
    exactly_one,
    nested,
)
from llmops.api.common import (
    Condition,
    LocalObjectReference,
    Name,
    ObjectMeta,
    PretrainedModel,
    Resources,
    Scheduling,
    Storage,
    conditions_field,
)

Objective = Literal["causal-lm", "masked-lm", "sft"]
EvalMetric = Literal["perplexity", "accuracy", "bleu"]
DEFAULT_METRICS: tuple[EvalMetric, ...] = ("perplexity",)
MAX_FOLDS = 20
# What a final evaluation scored: a split of the Dataset, or the held-out fold of a
# cross-validation run (`fold-<i>/<k>`).
EvaluatedSplit = Annotated[
    str, StringConstraints(pattern=r"^(test|validation|none|fold-[0-9]{1,2}/[0-9]{1,2})$")
]


def fold_split(fold: int, folds: int) -> str:
    """The split name of a cross-validation run's held-out fold (`fold-1/5`)."""
    return f"fold-{fold}/{folds}"


CHECKPOINT_NAME = r"^(latest|best|step-[0-9]+)$"
ModuleName = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.]+$")
]
# An lm-evaluation-harness task or group name, and one of its metric names (`acc`, `f1`).
BENCHMARK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
BENCHMARK_METRIC = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# A folder in the image (absolute, or relative to the working folder), on a claim, or in S3.
TASKS_PATH = (
    r"^(pvc://[a-z0-9][-a-z0-9.]*(/[^\s]*)?|s3://[a-z0-9][-a-z0-9.]*[a-z0-9](/[^\s]*)?|[^:\s]+)$"
)
MAX_BENCHMARKS = 8


class ModelArchitecture(ApiModel):
    """The model: built here from the fields below (the vocabulary size comes from the
    Dataset's tokenizer), or an open-weights model in Hugging Face format (`pretrained`)."""

    cel_rules = (
        Rule(
            cel="self.hiddenSize % self.numHeads == 0",
            message="hiddenSize must be divisible by numHeads",
            check=lambda s: s.hidden_size % s.num_heads == 0,
            field_path=".hiddenSize",
        ),
        Rule(
            cel="!has(self.numKeyValueHeads) || self.numHeads % self.numKeyValueHeads == 0",
            message="numHeads must be a multiple of numKeyValueHeads",
            check=lambda s: (
                s.num_key_value_heads is None or s.num_heads % s.num_key_value_heads == 0
            ),
            field_path=".numKeyValueHeads",
        ),
        Rule(
            cel="self.architecture == 'llama' || (!has(self.numKeyValueHeads) && "
            "!has(self.intermediateSize))",
            message="numKeyValueHeads and intermediateSize apply to architecture llama",
            check=lambda s: (
                s.architecture == "llama"
                or (s.num_key_value_heads is None and s.intermediate_size is None)
            ),
            field_path=".architecture",
        ),
        Rule(
            cel="self.objective != 'masked-lm' || (self.architecture == 'gpt' && "
            "!has(self.pretrained))",
            message="masked-lm trains the built-in gpt architecture only (an encoder)",
            check=lambda s: (
                s.objective != "masked-lm" or (s.architecture == "gpt" and s.pretrained is None)
            ),
            field_path=".objective",
        ),
        Rule(
            cel="!has(self.pretrained) || self.architecture == 'gpt'",
            message="a pretrained model brings its own architecture (config.json); "
            "leave architecture unset",
            check=lambda s: s.pretrained is None or s.architecture == "gpt",
            field_path=".architecture",
        ),
        Rule(
            cel="(!has(self.bias) && !has(self.activation)) "
            "|| (self.architecture == 'gpt' && !has(self.pretrained))",
            message="bias and activation shape a gpt model built from scratch; a llama or a "
            "pretrained model brings its own",
            check=lambda s: (
                (s.bias is None and s.activation is None)
                or (s.architecture == "gpt" and s.pretrained is None)
            ),
            field_path=".bias",
        ),
    )

    objective: Objective = Field(
        default="causal-lm",
        description=(
            "`causal-lm`: next-token prediction; `masked-lm`: predict masked tokens "
            "(bidirectional); `sft`: supervised fine-tuning on prompt/response pairs or chat "
            "messages (loss on the responses / assistant turns only)."
        ),
    )
    pretrained: PretrainedModel | None = Field(
        default=None,
        description=(
            "Start from an open-weights model (Llama, Qwen, Mistral, Gemma, GPT-2, any "
            "architecture transformers loads). Its config.json fixes the architecture; the "
            "fields below except contextLength and dropout are then ignored. Unset means a "
            "model built from the fields below."
        ),
    )
    architecture: Literal["gpt", "llama"] = Field(
        default="gpt",
        description=(
            "Architecture of a model built from scratch: `gpt` (learned positions, "
            "LayerNorm, GELU, multi-head attention) or `llama` (RoPE, RMSNorm, SwiGLU, "
            "grouped-query attention)."
        ),
    )
    num_layers: int = Field(default=6, description="Transformer blocks.", ge=1, le=256)
    num_heads: int = Field(default=6, description="Attention heads per block.", ge=1, le=256)
    num_key_value_heads: int | None = Field(
        default=None,
        description="llama: key/value heads (grouped-query attention); unset means numHeads.",
        ge=1,
        le=256,
    )
    hidden_size: int = Field(default=384, description="Embedding width.", ge=8, le=65536)
    intermediate_size: int | None = Field(
        default=None,
        description="llama: width of the SwiGLU feed-forward layer; unset means 8/3 x "
        "hiddenSize rounded up to a multiple of 64.",
        ge=8,
        le=1048576,
    )
    rope_theta: float = Field(
        default=10000.0, description="llama: base of the rotary position embedding.", gt=0
    )
    context_length: int = Field(
        default=256, description="Tokens per training sequence.", ge=8, le=1048576
    )
    dropout: float = Field(default=0.0, description="Dropout probability.", ge=0, lt=1)
    bias: bool | None = Field(
        default=None,
        description="gpt: biases in the linear layers and LayerNorms (GPT-2's layout); unset "
        "means true. `false` is nanoGPT's choice for small models: slightly faster and as good.",
    )
    activation: Literal["gelu-tanh", "gelu"] | None = Field(
        default=None,
        description="gpt: the feed-forward activation, GPT-2's tanh approximation of GELU "
        "(`gelu-tanh`, the default) or the exact GELU (`gelu`, nanoGPT's; cheaper on CPUs).",
    )

    @property
    def with_biases(self) -> bool:
        """bias, or what unset means (GPT-2's layout, with biases)."""
        return self.bias is not False

    @property
    def activation_function(self) -> Literal["gelu-tanh", "gelu"]:
        """activation, or what unset means (GPT-2's tanh GELU)."""
        return self.activation or "gelu-tanh"


class CheckpointRef(ApiModel):
    """A checkpoint of another TrainingRun."""

    name: Name = Field(description="Name of the TrainingRun, in the same namespace.")
    checkpoint: str = Field(
        default="latest",
        description="`latest`, `best` (lowest validation loss) or a step (`step-1200`).",
        max_length=32,
        pattern=CHECKPOINT_NAME,
    )


class Initialization(ApiModel):
    """Where the weights start: unset fields mean from scratch (random initialization)."""

    cel_rules = (
        Rule(
            cel="!(has(self.trainingRun) && has(self.path))",
            message="set at most one of trainingRun or path",
            check=lambda s: s.training_run is None or s.path is None,
        ),
    )

    training_run: CheckpointRef | None = Field(
        default=None, description="Continue from a checkpoint of another TrainingRun."
    )
    path: str | None = Field(
        default=None,
        description=(
            "Fine-tune from a checkpoint folder: an absolute path in the image, "
            "`pvc://<claim>/<path>` or `s3://<bucket>/<prefix>`."
        ),
        max_length=4096,
        pattern=r"^(/|pvc://|s3://)[^\s]*$",
    )


class Hyperparameters(ApiModel):
    """Optimization settings (AdamW)."""

    cel_rules = (
        Rule(
            cel="has(self.maxSteps) != has(self.maxTokens)",
            message="set exactly one of maxSteps or maxTokens",
            check=lambda s: (s.max_steps is None) != (s.max_tokens is None),
            field_path=".maxSteps",
        ),
        Rule(
            cel="!has(self.maxSteps) || self.warmupSteps < self.maxSteps",
            message="warmupSteps must be smaller than maxSteps",
            check=lambda s: s.max_steps is None or s.warmup_steps < s.max_steps,
            field_path=".warmupSteps",
        ),
        Rule(
            cel="self.minLearningRate <= self.learningRate",
            message="minLearningRate must not exceed learningRate",
            check=lambda s: s.min_learning_rate <= s.learning_rate,
            field_path=".minLearningRate",
        ),
    )

    learning_rate: float = Field(default=3e-4, description="Peak learning rate.", gt=0, le=10)
    min_learning_rate: float = Field(
        default=0.0, description="Learning rate at the end of the schedule.", ge=0, le=10
    )
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="cosine", description="Decay after warmup, down to minLearningRate."
    )
    warmup_steps: int = Field(
        default=0, description="Steps of linear warmup from 0.", ge=0, le=100_000_000
    )
    micro_batch_size: int = Field(
        default=8, description="Sequences per process per forward pass.", ge=1, le=65536
    )
    global_batch_size: int | None = Field(
        default=None,
        description=(
            "Sequences per optimizer step over all processes; must be a multiple of "
            "microBatchSize x numNodes x procsPerNode. Unset means "
            "microBatchSize x gradientAccumulationSteps x world size."
        ),
        ge=1,
        le=100_000_000,
    )
    gradient_accumulation_steps: int | None = Field(
        default=None,
        description=(
            "Micro-batches per optimizer step; unset means derived from globalBatchSize (or 1)."
        ),
        ge=1,
        le=65536,
    )
    max_steps: int | None = Field(
        default=None, description="Stop after this many optimizer steps.", ge=1, le=100_000_000
    )
    max_tokens: int | None = Field(
        default=None, description="Stop after this many training tokens.", ge=1
    )
    weight_decay: float = Field(default=0.1, description="AdamW weight decay.", ge=0, le=10)
    adam_beta1: float = Field(default=0.9, description="AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = Field(default=0.95, description="AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, description="AdamW epsilon.", gt=0, le=1)
    gradient_clipping: float = Field(
        default=1.0,
        description="Clip the global gradient norm to this; 0 disables.",
        ge=0,
        le=1_000_000,
    )
    seed: int = Field(default=1234, description="Random seed.", ge=0, le=4294967295)


class DeepSpeed(ApiModel):
    """DeepSpeed ZeRO settings."""

    cel_rules = (
        Rule(
            cel="self.offloadParameters == 'none' || self.zeroStage == 3",
            message="parameter offload needs zeroStage 3",
            check=lambda s: s.offload_parameters == "none" or s.zero_stage == 3,
            field_path=".offloadParameters",
        ),
        Rule(
            cel="self.offloadOptimizer == 'none' || self.zeroStage >= 1",
            message="optimizer offload needs zeroStage 1 or higher",
            check=lambda s: s.offload_optimizer == "none" or s.zero_stage >= 1,
            field_path=".offloadOptimizer",
        ),
        *ds_overlay.RULES,
    )

    zero_stage: int = Field(
        default=1,
        description="0: data parallel; 1: shard optimizer state; 2: + gradients; 3: + parameters.",
        ge=0,
        le=3,
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none", description="Keep optimizer state in CPU memory."
    )
    offload_parameters: Literal["none", "cpu"] = Field(
        default="none", description="Keep parameters in CPU memory (ZeRO-3)."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Training precision (mixed precision for bf16/fp16)."
    )
    activation_checkpointing: bool = Field(
        default=False,
        description=(
            "Recompute activations in the backward pass instead of keeping them (gradient "
            "checkpointing): less memory for about a third more compute."
        ),
    )
    config: ds_overlay.Overlay | None = Field(default=None, description=ds_overlay.DESCRIPTION)


class Adapter(ApiModel):
    """Parameter-efficient fine-tuning: train small adapter matrices, keep the base frozen."""

    type: Literal["lora"] = Field(default="lora", description="`lora` (low-rank adapters).")
    rank: int = Field(default=8, description="Rank of the adapter matrices.", ge=1, le=1024)
    alpha: float = Field(
        default=16.0, description="Scaling numerator (the update is scaled by alpha/rank).", gt=0
    )
    dropout: float = Field(default=0.05, description="Dropout on the adapter input.", ge=0, lt=1)
    target_modules: Annotated[list[ModuleName], AfterValidator(distinct)] = Field(
        default_factory=list,
        description=(
            "Names of the linear layers to adapt (`q_proj`, `v_proj`, ...); empty means every "
            "linear layer except the output head."
        ),
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    quantization: Literal["none", "4bit"] = Field(
        default="none",
        description="`4bit`: QLoRA, the frozen base in 4-bit NF4 (needs GPUs and bitsandbytes).",
    )
    merge: bool = Field(
        default=False,
        description="Also export the base model with the adapter merged in (a plain model).",
    )


class TrainingResources(Resources):
    """The gang: nodes, processes and accelerators, and compute per pod."""

    cel_rules = (
        Rule(
            cel="!has(self.procsPerNode) || self.gpusPerNode == 0 || "
            "self.procsPerNode == self.gpusPerNode",
            message="procsPerNode must equal gpusPerNode (one process per GPU)",
            check=lambda s: (
                s.procs_per_node is None
                or s.gpus_per_node == 0
                or s.procs_per_node == s.gpus_per_node
            ),
            field_path=".procsPerNode",
        ),
    )

    num_nodes: int = Field(default=1, description="Worker pods (one per node).", ge=1, le=1024)
    procs_per_node: int | None = Field(
        default=None,
        description="Training processes per pod. Unset means one per GPU, or one on CPUs: a "
        "process using all the pod's cores is faster than several sharing them (no gradient "
        "all-reduce, no lockstep).",
        ge=1,
        le=64,
    )
    gpus_per_node: int = Field(
        default=0, description="GPUs (`nvidia.com/gpu`) per pod; 0 trains on CPU.", ge=0, le=16
    )

    @property
    def processes_per_node(self) -> int:
        """procsPerNode, or what unset means."""
        return self.procs_per_node or self.gpus_per_node or 1


class Checkpointing(ApiModel):
    """When and where checkpoints are written; training resumes from the latest one."""

    interval_steps: int = Field(
        default=100, description="Steps between checkpoints.", ge=1, le=100_000_000
    )
    keep_last: int = Field(
        default=3, description="Checkpoints kept (the best one is always kept too).", ge=1, le=1000
    )
    storage: Storage | None = Field(
        default=None,
        description="Where checkpoints go; unset means a new 10Gi claim `<name>-checkpoints`.",
    )


class EarlyStopping(ApiModel):
    """Stop when the validation metric stops improving."""

    metric: Literal["loss", "perplexity", "accuracy", "bleu"] = Field(
        default="loss", description="Validation metric to watch (`loss` is always computed)."
    )
    patience: int = Field(
        default=5, description="Evaluations without improvement before stopping.", ge=1, le=1000
    )
    min_delta: float = Field(
        default=0.0, description="Smallest change that counts as improvement.", ge=0, le=1_000_000
    )


class BenchmarkTasks(ApiModel):
    """Where a benchmark's task definitions are: one folder holding lm-evaluation-harness task
    YAML files and their data (e.g. `dataset_path: json` over a jsonl file named relative to
    the folder). Nothing is downloaded at run time: a task must read its data from here."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("path", "configMap"),
            message="set exactly one of path or configMap",
            check=lambda s: exactly_one(s, "path", "config_map"),
        ),
        Rule(
            cel="!has(self.endpoint) || (has(self.path) && self.path.startsWith('s3://'))",
            message="endpoint applies only to an s3:// path",
            check=lambda s: s.endpoint is None or (s.path or "").startswith("s3://"),
            field_path=".endpoint",
        ),
        Rule(
            cel="!has(self.credentialsSecret) || (has(self.path) && self.path.startsWith('s3://'))",
            message="credentialsSecret applies only to an s3:// path",
            check=lambda s: s.credentials_secret is None or (s.path or "").startswith("s3://"),
            field_path=".credentialsSecret",
        ),
    )

    path: str | None = Field(
        default=None,
        description=(
            "The folder: a path in the image (absolute, or relative to the working folder), "
            "`pvc://<claim>/<path>` (mounted read-only) or `s3://<bucket>/<prefix>` (copied "
            "before the evaluation)."
        ),
        max_length=4096,
        pattern=TASKS_PATH,
    )
    config_map: LocalObjectReference | None = Field(
        default=None,
        description="A ConfigMap in the same namespace whose keys are the folder's files.",
    )
    endpoint: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store for an `s3://` path; unset means AWS S3.",
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
    )
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret holding `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` for an `s3://` "
            "path; unset means the pod's own identity."
        ),
    )


class Benchmark(ApiModel):
    """A standard benchmark run on the final model with EleutherAI's lm-evaluation-harness
    (`lm-eval`), offline, after the final evaluation: its score goes to
    `status.finalEvaluation.benchmarks`, the model card and eval_report.json, and a
    ModelDeployment's gate can compare it."""

    name: str = Field(
        description="The lm-eval task (or group) to run, as its task YAML names it.",
        min_length=1,
        max_length=128,
        pattern=BENCHMARK_NAME,
    )
    tasks: BenchmarkTasks = Field(description="The folder with the task YAML and its data.")
    num_fewshot: int | None = Field(
        default=None,
        description="Examples in each prompt; unset means the task's own setting (0 if none).",
        ge=0,
        le=64,
    )
    limit: int | None = Field(
        default=None,
        description="Most documents scored per task (the first ones); unset means all.",
        ge=1,
        le=10_000_000,
    )
    metric: str = Field(
        default="acc",
        description=(
            "The task metric reported as the benchmark's score (and compared by gates): "
            "`acc`, `acc_norm`, `exact_match`, ... as the task's metric_list names it."
        ),
        max_length=64,
        pattern=BENCHMARK_METRIC,
    )
    batch_size: int = Field(
        default=8, description="Requests scored per forward pass.", ge=1, le=4096
    )


class Evaluation(ApiModel):
    """Periodic evaluation on the validation split (and optionally on the training split), a
    final one on the test split, and how often training metrics are logged."""

    cel_rules = (
        Rule(
            cel="!has(self.earlyStopping) || self.earlyStopping.metric == 'loss' || "
            "self.earlyStopping.metric in self.metrics",
            message="earlyStopping.metric must be loss or one of metrics",
            check=lambda s: (
                s.early_stopping is None
                or s.early_stopping.metric == "loss"
                or s.early_stopping.metric in s.metrics
            ),
            field_path=".earlyStopping.metric",
        ),
        Rule(
            cel="self.benchmarks.all(a, self.benchmarks.exists_one(b, b.name == a.name))",
            message="benchmark names must be distinct",
            check=lambda s: len({b.name for b in s.benchmarks}) == len(s.benchmarks),
            field_path=".benchmarks",
        ),
    )

    interval_steps: int = Field(
        default=100, description="Steps between evaluations.", ge=1, le=100_000_000
    )
    batches: int = Field(
        default=20,
        description=(
            "Batches scored per evaluation: batches x microBatchSize x processes samples of "
            "the split (all of it when smaller); `sample` says which."
        ),
        ge=1,
        le=100000,
    )
    sample: Literal["fixed", "fresh"] = Field(
        default="fixed",
        description=(
            "Which samples an evaluation scores. `fixed`: the same subset every time, drawn "
            "once from hyperparameters.seed, so successive scores differ only by the weights. "
            "`fresh`: a new subset at each evaluation, drawn from the seed and the step (a "
            "resumed run draws the same ones), which covers more of the split over a run but "
            "adds sampling noise to the curve. The final evaluation always scores the fixed "
            "subset."
        ),
    )
    at_start: bool = Field(
        default=True,
        description=(
            "Also evaluate at step 0, before the first update, when the run starts from "
            "step 0 (not on resume): the curves start at the initial weights, and early "
            "stopping's first score to beat is theirs."
        ),
    )
    train_split: bool = Field(
        default=False,
        description=(
            "Also score a subset of the training split at each evaluation, as the validation "
            "split is scored (`trainSplitLoss` in metrics.jsonl, next to `valLoss`): the two "
            "curves apart mean overfitting."
        ),
    )
    log_interval_steps: int = Field(
        default=10,
        description=(
            "Steps between training-metric entries (metrics.jsonl, progress, Prometheus); "
            "the LLMOPS_LOG_INTERVAL environment variable of the pods overrides it."
        ),
        ge=1,
        le=100_000_000,
    )
    metrics: Annotated[list[EvalMetric], AfterValidator(distinct)] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        description="Metrics besides loss: `perplexity`, token `accuracy`, `bleu` (sft only).",
        max_length=3,
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    early_stopping: EarlyStopping | None = Field(
        default=None, description="Stop early when the validation metric stalls."
    )
    benchmarks: list[Benchmark] = Field(
        default_factory=list,
        description=(
            "Standard benchmarks run on the final model with lm-evaluation-harness (rank 0, "
            "offline, task data from `tasks`); a causal model with a tokenizer is needed."
        ),
        max_length=MAX_BENCHMARKS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


def _world(spec: TrainingRunSpec) -> int:
    return spec.resources.num_nodes * spec.resources.processes_per_node


def _batch_ok(spec: TrainingRunSpec) -> bool:
    hp = spec.hyperparameters
    if hp.global_batch_size is None:
        return True
    per_step = hp.micro_batch_size * _world(spec)
    if hp.gradient_accumulation_steps is not None:
        return hp.global_batch_size == per_step * hp.gradient_accumulation_steps
    return hp.global_batch_size % per_step == 0


class Budget(ApiModel):
    """Cost limits: when one is reached the pods are stopped (they checkpoint on SIGTERM) and
    the run fails with reason BudgetExhausted, its checkpoints kept."""

    max_accelerator_hours: float | None = Field(
        default=None,
        description=(
            "Most accelerator-hours to spend: GPU-hours (pods x gpusPerNode x hours running), "
            "or pod-hours for a CPU-only gang."
        ),
        gt=0,
    )
    max_wall_time_seconds: int | None = Field(
        default=None,
        description="Most seconds from the start of training, suspended time included.",
        ge=1,
    )


_WORLD = (
    "self.hyperparameters.microBatchSize * self.resources.numNodes * "
    "(has(self.resources.procsPerNode) ? self.resources.procsPerNode : "
    "(self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1))"
)


class CrossValidation(ApiModel):
    """k-fold cross-validation: the Dataset's training split is cut into `folds` contiguous
    blocks of samples; this run trains on all but block `fold` and validates on that one
    (periodic and final evaluation), instead of on the validation split. A Sweep with
    `crossValidation` creates the k runs of each trial."""

    cel_rules = (
        Rule(
            cel="self.fold < self.folds",
            message="fold must be less than folds (folds are numbered 0 to folds-1)",
            check=lambda c: c.fold < c.folds,
            field_path=".fold",
        ),
    )

    folds: int = Field(description="Number of folds k.", ge=2, le=MAX_FOLDS)
    fold: int = Field(
        description="The held-out fold of this run, 0 to folds-1.", ge=0, le=MAX_FOLDS - 1
    )


class TrainingRunSpec(ApiModel):
    """Desired state of a TrainingRun."""

    cel_rules = (
        Rule(
            cel="!has(self.hyperparameters.globalBatchSize) || "
            "(has(self.hyperparameters.gradientAccumulationSteps) ? "
            f"self.hyperparameters.globalBatchSize == {_WORLD} * "
            "self.hyperparameters.gradientAccumulationSteps : "
            f"self.hyperparameters.globalBatchSize % ({_WORLD}) == 0)",
            message=(
                "globalBatchSize must equal microBatchSize x gradientAccumulationSteps x "
                "numNodes x procsPerNode (a multiple of microBatchSize x numNodes x procsPerNode)"
            ),
            check=_batch_ok,
            field_path=".hyperparameters.globalBatchSize",
        ),
        Rule(
            cel="!('bleu' in self.evaluation.metrics) || self.model.objective == 'sft'",
            message="the bleu metric needs objective sft (reference responses)",
            check=lambda s: "bleu" not in s.evaluation.metrics or s.model.objective == "sft",
            field_path=".evaluation.metrics",
        ),
        Rule(
            cel="!has(self.evaluation.benchmarks) || size(self.evaluation.benchmarks) == 0 || "
            "self.model.objective != 'masked-lm'",
            message="benchmarks score a causal model: objective causal-lm or sft",
            check=lambda s: not s.evaluation.benchmarks or s.model.objective != "masked-lm",
            field_path=".evaluation.benchmarks",
        ),
        Rule(
            cel="!has(self.adapter) || has(self.model.pretrained)",
            message="an adapter fine-tunes a pretrained model: set model.pretrained",
            check=lambda s: s.adapter is None or s.model.pretrained is not None,
            field_path=".adapter",
        ),
        Rule(
            cel="!has(self.model.pretrained) || !has(self.init)",
            message="set at most one of model.pretrained and init (both give starting weights)",
            check=lambda s: s.model.pretrained is None or s.init is None,
            field_path=".init",
        ),
        Rule(
            cel="!has(self.adapter) || self.adapter.quantization == 'none' || "
            "self.resources.gpusPerNode > 0",
            message="4-bit quantization (QLoRA) needs GPUs (resources.gpusPerNode)",
            check=lambda s: (
                s.adapter is None
                or s.adapter.quantization == "none"
                or s.resources.gpus_per_node > 0
            ),
            field_path=".adapter.quantization",
        ),
    )

    dataset_ref: LocalObjectReference = Field(
        description="The Dataset to train on (its tokenizer fixes the vocabulary).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "datasetRef is immutable"}
            ]
        },
    )
    model: ModelArchitecture = nested(
        ModelArchitecture,
        "Model architecture and objective.",
        **{
            "x-kubernetes-validations": [
                {
                    "rule": "self == oldSelf",
                    "message": "model is immutable; create a new TrainingRun instead",
                }
            ]
        },
    )
    init: Initialization | None = Field(
        default=None, description="Starting weights; unset means from scratch."
    )
    adapter: Adapter | None = Field(
        default=None,
        description="Fine-tune with adapters (LoRA) instead of all weights; needs "
        "model.pretrained.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "adapter is immutable"}
            ]
        },
    )
    hyperparameters: Hyperparameters = Field(description="Optimization settings.")
    cross_validation: CrossValidation | None = Field(
        default=None,
        description=(
            "Train on k-1 folds of the training split and validate on the held-out fold "
            "(status.metrics and finalEvaluation then score that fold); unset trains on the "
            "whole training split and validates on the validation split."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "crossValidation is immutable"}
            ]
        },
    )
    deepspeed: DeepSpeed = nested(DeepSpeed, "DeepSpeed ZeRO settings.")
    resources: TrainingResources = nested(TrainingResources, "The gang of worker pods.")
    scheduling: Scheduling = nested(Scheduling, "Placement and priority of the worker pods.")
    checkpointing: Checkpointing = nested(Checkpointing, "Checkpoint interval and retention.")
    evaluation: Evaluation = nested(
        Evaluation, "Evaluation interval, samples, metrics, early stopping; the log interval."
    )
    max_restarts: int = Field(
        default=3,
        description="Restarts of the gang after a failure (preemption does not count).",
        ge=0,
        le=100,
    )
    active_deadline_seconds: int | None = Field(
        default=None, description="Fail the run after this long, wherever it is.", ge=1
    )
    budget: Budget | None = Field(
        default=None, description="Cost limits; reaching one checkpoints and stops the run."
    )
    suspend: bool = Field(
        default=False,
        description="Stop the pods, keeping checkpoints; unsuspend to resume from the latest.",
    )


class TrainingMetrics(StatusModel):
    """The latest training and validation metrics."""

    train_loss: float | None = Field(default=None, description="Training loss (latest step).")
    train_loss_text: float | None = Field(
        default=None,
        description=(
            "Dataset mixing plain text and supervised records: the latest step's mean loss "
            "on the plain-text tokens."
        ),
    )
    train_loss_supervised: float | None = Field(
        default=None,
        description=(
            "Dataset mixing plain text and supervised records: the latest step's mean loss "
            "on the supervised records' learned tokens (responses with objective sft)."
        ),
    )
    validation_loss: float | None = Field(default=None, description="Latest validation loss.")
    validation_loss_text: float | None = Field(
        default=None, description="Mixed Dataset: latest validation loss of the plain text."
    )
    validation_loss_supervised: float | None = Field(
        default=None,
        description="Mixed Dataset: latest validation loss of the supervised records.",
    )
    perplexity: float | None = Field(default=None, description="Latest validation perplexity.")
    accuracy: float | None = Field(default=None, description="Latest validation token accuracy.")
    bleu: float | None = Field(default=None, description="Latest validation BLEU (sft).")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(
        default=None, description="Training throughput over all processes."
    )
    mfu: float | None = Field(
        default=None, description="Model FLOPs utilization, a ratio from 0 to 1."
    )


class CheckpointInfo(StatusModel):
    """A written checkpoint."""

    name: str = Field(description="Checkpoint name (`step-<N>`).")
    step: int = Field(description="Optimizer step it was taken at.", ge=0)
    uri: str = Field(description="Where it is (`pvc://...` or `s3://...`).")
    validation_loss: float | None = Field(
        default=None, description="Validation loss at that step, if evaluated."
    )


class Checkpoints(StatusModel):
    """The checkpoints a ModelDeployment or another TrainingRun can start from."""

    latest: CheckpointInfo | None = Field(default=None, description="The newest checkpoint.")
    best: CheckpointInfo | None = Field(
        default=None, description="The checkpoint with the lowest validation loss."
    )


class BenchmarkScore(StatusModel):
    """A benchmark's score on the final model (lm-evaluation-harness)."""

    name: str = Field(description="The benchmark (lm-eval task or group).")
    metric: str = Field(description="The metric reported (`acc`, `exact_match`, ...).")
    value: float = Field(description="Its value.")
    stderr: float | None = Field(default=None, description="Its standard error, if computed.")
    higher_is_better: bool = Field(default=True, description="Whether larger values are better.")
    samples: int | None = Field(default=None, description="Documents scored.", ge=0)


class FinalEvaluation(StatusModel):
    """Evaluation on the test split after training."""

    split: EvaluatedSplit | None = Field(
        default=None,
        description=(
            "The split evaluated: `test`; `validation` when the Dataset has no test split; "
            "`none` when it has neither (no final evaluation); `fold-<i>/<k>`: the held-out "
            "fold of a cross-validation run."
        ),
    )
    loss: float | None = Field(default=None, description="Test loss.")
    perplexity: float | None = Field(default=None, description="Test perplexity.")
    accuracy: float | None = Field(default=None, description="Test token accuracy.")
    bleu: float | None = Field(default=None, description="Test BLEU (sft).")
    benchmarks: list[BenchmarkScore] | None = Field(
        default=None,
        description="Scores of spec.evaluation.benchmarks (lm-evaluation-harness).",
        max_length=MAX_BENCHMARKS,
    )

    def benchmark(self, name: str) -> BenchmarkScore | None:
        return next((b for b in self.benchmarks or [] if b.name == name), None)


class TrainingRunStatus(StatusModel):
    """Observed state of a TrainingRun."""

    phase: (
        Literal["Pending", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
        | None
    ) = Field(
        default=None,
        description=(
            "Coarse lifecycle phase. Queued: the gang waits for admission by the Kueue "
            "queue named in spec.scheduling.queueName (the Running condition says why)."
        ),
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation last acted on.", ge=0
    )
    conditions: list[Condition] = conditions_field()
    step: int | None = Field(default=None, description="Optimizer steps done.", ge=0)
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.", ge=0)
    progress: int | None = Field(
        default=None, description="Percentage of totalSteps done.", ge=0, le=100
    )
    estimated_remaining_seconds: int | None = Field(
        default=None, description="Estimated seconds until training ends.", ge=0
    )
    metrics: TrainingMetrics | None = Field(default=None, description="The latest metrics.")
    checkpoints: Checkpoints | None = Field(
        default=None, description="Latest and best checkpoints."
    )
    restart_count: int = Field(default=0, description="Restarts after failures so far.", ge=0)
    preemption_count: int = Field(
        default=0,
        description="Restarts after preemption or node drain (not counted against maxRestarts).",
        ge=0,
    )
    start_time: datetime | None = Field(default=None, description="When training started.")
    completion_time: datetime | None = Field(default=None, description="When training ended.")
    final_evaluation: FinalEvaluation | None = Field(
        default=None, description="Evaluation on the test split."
    )
    model_uri: str | None = Field(
        default=None, description="Where the final model is (`pvc://...` or `s3://...`)."
    )
    accelerator_hours: float | None = Field(
        default=None,
        description="Accelerator-hours used so far (GPU-hours; pod-hours for a CPU gang).",
        ge=0,
    )
    accounted_until: datetime | None = Field(
        default=None, description="Until when acceleratorHours is counted."
    )


class TrainingRun(ApiModel):
    """A TrainingRun custom resource."""

    cel_rules = (
        Rule(
            cel="!has(self.spec.init) || !has(self.spec.init.trainingRun) || "
            "self.spec.init.trainingRun.name != self.metadata.name",
            message="a TrainingRun cannot start from its own checkpoints",
            check=lambda r: (
                r.spec.init is None
                or r.spec.init.training_run is None
                or r.spec.init.training_run.name != r.metadata.name
            ),
            field_path=".spec.init.trainingRun.name",
        ),
    )

    api_version: Literal["llmops.dev/v1alpha1"] = Field(description="API version.")
    kind: Literal["TrainingRun"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: TrainingRunSpec = Field(description="Desired state.")
    status: TrainingRunStatus = Field(
        default_factory=TrainingRunStatus, description="Observed state."
    )
