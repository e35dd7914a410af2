"""ModelDeployment: serve a trained model through an OpenAI-compatible API, autoscaled."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmops.api.base import ApiModel, Rule, StatusModel, cel_exactly_one, exactly_one, nested
from llmops.api.common import (
    Condition,
    LocalObjectReference,
    Name,
    ObjectMeta,
    Resources,
    Scheduling,
    SecretKeySelector,
    conditions_field,
)
from llmops.api.trainingrun import BENCHMARK_NAME, FinalEvaluation

INT_OR_PERCENT = r"^[0-9]+%?$"


class TrainingRunModel(ApiModel):
    """A checkpoint of a TrainingRun in the same namespace."""

    cel_rules = (
        Rule(
            cel="(self.policy == 'pinned') == has(self.checkpoint)",
            message="checkpoint is required with policy pinned and not allowed otherwise",
            check=lambda s: (s.policy == "pinned") == (s.checkpoint is not None),
            field_path=".checkpoint",
        ),
    )

    name: Name = Field(description="Name of the TrainingRun.")
    policy: Literal["latest", "best", "pinned"] = Field(
        default="latest",
        description=(
            "`latest`: follow the newest checkpoint (rolls out as training goes on); `best`: "
            "follow the lowest validation loss; `pinned`: serve `checkpoint` only."
        ),
    )
    checkpoint: str | None = Field(
        default=None,
        description="Checkpoint to serve with policy pinned (`step-1200`).",
        max_length=32,
        pattern=r"^step-[0-9]+$",
    )


class SweepModel(ApiModel):
    """The best trial of a Sweep in the same namespace."""

    name: Name = Field(
        description="Name of the Sweep; its best trial's final model (latest checkpoint while "
        "it runs) is served, and follows a new best trial."
    )


class TrainingScheduleModel(ApiModel):
    """The newest succeeded run of a TrainingSchedule in the same namespace."""

    name: Name = Field(
        description="Name of the TrainingSchedule; its newest succeeded run's model is served."
    )


class EvaluationGate(ApiModel):
    """A new model replaces the served one only if its final (test-split) evaluation is not
    worse than the served model's by more than the margin, and reaches the threshold when one
    is set; otherwise it is held back and status says why. The first model has nothing to
    compare with and passes (the threshold still applies)."""

    metric: Literal["loss", "perplexity", "accuracy"] = Field(
        default="loss",
        description=(
            "Final-evaluation metric compared (loss and perplexity: lower is better); "
            "`benchmark` replaces it."
        ),
    )
    benchmark: str | None = Field(
        default=None,
        description=(
            "Compare this benchmark's score instead (a name in the TrainingRun's "
            "spec.evaluation.benchmarks; its metric, in the direction lm-eval says is better)."
        ),
        min_length=1,
        max_length=128,
        pattern=BENCHMARK_NAME,
    )
    max_regression: float = Field(
        default=0.0,
        description="Largest relative worsening allowed (0.02: up to 2% worse still rolls out).",
        ge=0,
        le=1,
    )
    threshold: float | None = Field(
        default=None,
        description=(
            "The score a model must reach to roll out at all (at least this when higher is "
            "better, at most when lower is), served model or not."
        ),
    )


class ModelSource(ApiModel):
    """What to serve: exactly one of trainingRun, trainingSchedule, sweep or uri."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("trainingRun", "trainingSchedule", "sweep", "uri"),
            message="exactly one of trainingRun, trainingSchedule, sweep or uri must be set",
            check=lambda s: exactly_one(s, "training_run", "training_schedule", "sweep", "uri"),
        ),
        Rule(
            cel="!has(self.gate) || !has(self.uri)",
            message="a gate compares evaluations of trained models; a uri has none",
            check=lambda s: s.gate is None or s.uri is None,
            field_path=".gate",
        ),
    )

    training_run: TrainingRunModel | None = Field(
        default=None, description="Serve a checkpoint of a TrainingRun."
    )
    training_schedule: TrainingScheduleModel | None = Field(
        default=None, description="Follow the newest succeeded run of a TrainingSchedule."
    )
    sweep: SweepModel | None = Field(default=None, description="Serve the best trial of a Sweep.")
    gate: EvaluationGate | None = Field(
        default=None,
        description=(
            "Roll out a new model only if its final evaluation is not worse than the served "
            "one's; models without a final evaluation (unfinished runs) wait."
        ),
    )
    uri: str | None = Field(
        default=None,
        description=(
            "Serve a model folder: an absolute path in the image, `pvc://<claim>/<path>` "
            "or `s3://<bucket>/<prefix>`."
        ),
        max_length=4096,
        pattern=r"^(/|pvc://|s3://)[^\s]*$",
    )
    served_name: str | None = Field(
        default=None,
        description=(
            "Model name clients send in the OpenAI `model` field; unset means the resource name."
        ),
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
    )


class ScalingPolicy(ApiModel):
    """How fast replicas may change (an HPA scaling policy)."""

    type: Literal["Pods", "Percent"] = Field(description="Change by a number or a percentage.")
    value: int = Field(
        description="Replicas (Pods) or percent (Percent) per period.", ge=1, le=100000
    )
    period_seconds: int = Field(
        default=60, description="Window the change is allowed in.", ge=1, le=1800
    )


class ScalingRules(ApiModel):
    """Scale-up or scale-down behaviour."""

    stabilization_window_seconds: int | None = Field(
        default=None,
        description="Look-back window against flapping; unset means 0 up, 300 down.",
        ge=0,
        le=3600,
    )
    select_policy: Literal["Max", "Min", "Disabled"] = Field(
        default="Max", description="Which policy wins when several apply; Disabled never scales."
    )
    policies: list[ScalingPolicy] = Field(
        default_factory=list,
        description="Limits on the rate of change.",
        max_length=10,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )


class Autoscaling(ApiModel):
    """Replica autoscaling on a serving metric."""

    cel_rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="minReplicas must not exceed maxReplicas",
            check=lambda s: s.min_replicas <= s.max_replicas,
            field_path=".minReplicas",
        ),
        Rule(
            cel="self.metric != 'cpu' || self.target <= 100.0",
            message="a cpu target is a utilization percentage, at most 100",
            check=lambda s: s.metric != "cpu" or s.target <= 100,
            field_path=".target",
        ),
        Rule(
            cel="self.minReplicas > 0 || self.metric != 'cpu'",
            message="scaling to zero needs a request metric (cpu is not measured at zero replicas)",
            check=lambda s: s.min_replicas > 0 or s.metric != "cpu",
            field_path=".minReplicas",
        ),
        Rule(
            cel="self.minReplicas > 0 || self.engine == 'keda'",
            message="scaling to zero needs engine keda (the HorizontalPodAutoscaler stops at 1)",
            check=lambda s: s.min_replicas > 0 or s.engine == "keda",
            field_path=".minReplicas",
        ),
    )

    engine: Literal["hpa", "keda"] = Field(
        default="hpa",
        description=(
            "`hpa`: a HorizontalPodAutoscaler (request metrics through the custom metrics API: "
            "prometheus-adapter with the rules in the chart's prometheus-adapter-values.yaml); "
            "`keda`: a KEDA ScaledObject querying Prometheus, which can scale to zero and back "
            "on the first request."
        ),
    )
    prometheus_address: str | None = Field(
        default=None,
        description=(
            "Prometheus URL KEDA queries; unset means the address the operator was configured with."
        ),
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
    )

    min_replicas: int = Field(
        default=1, description="Fewest replicas; 0 scales to zero.", ge=0, le=1000
    )
    max_replicas: int = Field(description="Most replicas.", ge=1, le=1000)
    metric: Literal["cpu", "in-flight-requests", "queue-depth", "tokens-per-second"] = Field(
        default="in-flight-requests",
        description=(
            "Scaling signal: `cpu` utilization percent, `in-flight-requests` or `queue-depth` "
            "per replica, or generated `tokens-per-second` per replica (with runtime vllm: "
            "vLLM's `vllm:num_requests_running`, `vllm:num_requests_waiting` and the rate of "
            "`vllm:generation_tokens_total`)."
        ),
    )
    target: float = Field(
        description="Target value of the metric per replica.", gt=0, le=1_000_000_000
    )
    scale_up: ScalingRules | None = Field(default=None, description="Scale-up behaviour.")
    scale_down: ScalingRules | None = Field(default=None, description="Scale-down behaviour.")


class Server(ApiModel):
    """The inference server."""

    cel_rules = (
        Rule(
            cel="!has(self.contextLength) || self.maxNewTokens < self.contextLength",
            message="maxNewTokens must be smaller than contextLength",
            check=lambda s: s.context_length is None or s.max_new_tokens < s.context_length,
            field_path=".maxNewTokens",
        ),
        Rule(
            cel="self.maxConcurrency >= self.maxBatchSize",
            message="maxConcurrency must be at least maxBatchSize",
            check=lambda s: s.max_concurrency >= s.max_batch_size,
            field_path=".maxConcurrency",
        ),
    )

    max_batch_size: int = Field(
        default=8, description="Sequences decoded together in one batch.", ge=1, le=1024
    )
    max_new_tokens: int = Field(
        default=256, description="Upper bound on generated tokens per request.", ge=1, le=1048576
    )
    context_length: int | None = Field(
        default=None,
        description="Prompt plus generated tokens; unset means the model's context length.",
        ge=2,
        le=1048576,
    )
    max_concurrency: int = Field(
        default=64,
        description=(
            "Requests admitted at once per replica (running plus scheduled). More wait, in "
            "order, up to 30 s and at most 4 x this many; beyond that the answer is 429 with a "
            "Retry-After estimate."
        ),
        ge=1,
        le=100000,
    )
    port: int = Field(default=8000, description="HTTP port of the API.", ge=1024, le=65535)
    auth_token_secret: SecretKeySelector | None = Field(
        default=None,
        description="Secret key holding the bearer token clients must send; unset means no auth.",
    )


class ServingResources(Resources):
    """Compute per replica."""

    gpus: int = Field(
        default=0,
        description=(
            "GPUs (`nvidia.com/gpu`) per replica; with runtime vllm also the tensor-parallel "
            "size (at least 1)."
        ),
        ge=0,
        le=16,
    )
    image: str | None = Field(
        default=None,
        description=(
            "Container image; unset means the image the operator is configured with for the "
            "runtime: the trainer image (builtin) or the pinned vLLM image (vllm)."
        ),
        max_length=512,
        pattern=r"^[^\s]+$",
    )


class VllmSettings(ApiModel):
    """Engine settings of vLLM's OpenAI-compatible server (runtime vllm). The model is the
    folder of `model`, the served name `model.servedName`, the tensor-parallel size
    `resources.gpus`, the port `server.port` and the API key `server.authTokenSecret`."""

    max_model_len: int | None = Field(
        default=None,
        description=(
            "Prompt plus generated tokens per sequence (`--max-model-len`); unset means the "
            "model's context length."
        ),
        ge=1,
        le=16777216,
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description=(
            "Data type of weights and activations (`--dtype`); `auto`: the checkpoint's own "
            "precision, except that float32 checkpoints run in float16."
        ),
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        description=(
            "Fraction of each GPU's memory vLLM may use for weights, activations and KV cache "
            "(`--gpu-memory-utilization`), above 0 and at most 1."
        ),
        gt=0,
        le=1,
    )


class AdapterSource(ApiModel):
    """A LoRA adapter served under its own model name on the deployment's base model."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("trainingRun", "uri"),
            message="exactly one of trainingRun or uri must be set",
            check=lambda s: exactly_one(s, "training_run", "uri"),
        ),
        Rule(
            cel="!has(self.uri) || (self.policy == 'final' && !has(self.gate))",
            message="policy and gate follow a trainingRun; a uri is served as it is",
            check=lambda s: s.uri is None or (s.policy == "final" and s.gate is None),
            field_path=".policy",
        ),
    )

    name: str = Field(
        description="Model name clients send to get this adapter (`model` in a request).",
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$",
    )
    training_run: LocalObjectReference | None = Field(
        default=None,
        description=(
            "A LoRA TrainingRun (spec.adapter) whose exported adapter is served once it "
            "succeeded; a newer run of the same name is picked up on its completion."
        ),
    )
    uri: str | None = Field(
        default=None,
        description="An adapter folder in peft's layout: `pvc://<claim>/<path>` or an "
        "absolute path in the image.",
        max_length=4096,
        pattern=r"^(/|pvc://)[^\s]*$",
    )
    policy: Literal["final", "latest", "best"] = Field(
        default="final",
        description=(
            "Which version of the TrainingRun's adapter: `final`, the exported adapter once "
            "the run succeeded; `latest`, the newest checkpoint's while it trains (then the "
            "final one); `best`, the checkpoint with the lowest validation loss. The built-in "
            "server loads a new version without a restart; vLLM replicas roll."
        ),
    )
    gate: EvaluationGate | None = Field(
        default=None,
        description=(
            "Serve a new version only if the run's final evaluation passes the gate against "
            "the version served (as spec.model.gate does for the base model)."
        ),
    )


class Rollout(ApiModel):
    """How a new model version or spec replaces running replicas."""

    cel_rules = (
        Rule(
            cel="self.strategy == 'RollingUpdate' || "
            "(!has(self.maxSurge) && !has(self.maxUnavailable))",
            message="maxSurge and maxUnavailable apply only to RollingUpdate",
            check=lambda s: (
                s.strategy == "RollingUpdate" or (s.max_surge is None and s.max_unavailable is None)
            ),
            field_path=".strategy",
        ),
        Rule(
            cel="!has(self.maxSurge) || !has(self.maxUnavailable) || "
            "self.maxSurge.replace('%', '') != '0' || self.maxUnavailable.replace('%', '') != '0'",
            message="maxSurge and maxUnavailable cannot both be zero",
            check=lambda s: (
                s.max_surge is None
                or s.max_unavailable is None
                or s.max_surge.rstrip("%") != "0"
                or s.max_unavailable.rstrip("%") != "0"
            ),
            field_path=".maxUnavailable",
        ),
    )

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        default="RollingUpdate", description="Deployment strategy."
    )
    max_surge: str | None = Field(
        default=None,
        description="Extra replicas during a rollout (`1` or `25%`); unset means 25%.",
        max_length=8,
        pattern=INT_OR_PERCENT,
    )
    max_unavailable: str | None = Field(
        default=None,
        description="Replicas that may be down during a rollout (`0` or `25%`); unset means 25%.",
        max_length=8,
        pattern=INT_OR_PERCENT,
    )


class ModelDeploymentSpec(ApiModel):
    """Desired state of a ModelDeployment."""

    cel_rules = (
        Rule(
            cel="!has(self.vllm) || self.runtime == 'vllm'",
            message="vllm settings apply only with runtime vllm",
            check=lambda s: s.vllm is None or s.runtime == "vllm",
            field_path=".vllm",
        ),
        Rule(
            cel="self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))",
            message="adapter names must be distinct",
            check=lambda s: len({a.name for a in s.adapters}) == len(s.adapters),
            field_path=".adapters",
        ),
        Rule(
            cel="!has(self.adapters) || !has(self.model.servedName) || "
            "self.adapters.all(a, a.name != self.model.servedName)",
            message="an adapter's name must differ from model.servedName",
            check=lambda s: all(a.name != s.model.served_name for a in s.adapters),
            field_path=".adapters",
        ),
        Rule(
            cel="self.runtime != 'vllm' || self.resources.gpus >= 1",
            message="runtime vllm needs at least one GPU per replica (resources.gpus >= 1)",
            check=lambda s: s.runtime != "vllm" or s.resources.gpus >= 1,
            field_path=".resources.gpus",
        ),
        Rule(
            cel="self.runtime != 'vllm' || !has(self.model.trainingRun) || "
            "self.model.trainingRun.policy == 'latest'",
            message=(
                "runtime vllm loads Hugging Face model folders: a TrainingRun's final model "
                "(policy latest), not its DeepSpeed checkpoints (best, pinned)"
            ),
            check=lambda s: (
                s.runtime != "vllm"
                or s.model.training_run is None
                or s.model.training_run.policy == "latest"
            ),
            field_path=".model.trainingRun.policy",
        ),
    )

    model: ModelSource = Field(description="The model to serve.")
    runtime: Literal["builtin", "vllm"] = Field(
        default="builtin",
        description=(
            "Inference server: `builtin` (llmops' own engine: CPU or GPU, every model folder "
            "the trainer writes) or `vllm` (vLLM's OpenAI-compatible server, GPUs only, Hugging "
            "Face-format models; `server.port` and `server.authTokenSecret` apply, the other "
            "`server` fields are the builtin engine's, and `vllm` tunes the engine). Changing "
            "it rolls the same Deployment over to the other server."
        ),
    )
    vllm: VllmSettings | None = Field(
        default=None, description="vLLM engine settings; only with runtime vllm."
    )
    adapters: list[AdapterSource] = Field(
        default_factory=list,
        description=(
            "LoRA adapters of the base model, each served under its own name; a request "
            "naming the base gets the base. Both runtimes batch them with the base."
        ),
        max_length=16,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    replicas: int = Field(
        default=1,
        description=(
            "Replicas when autoscaling is off (also the `kubectl scale` target). With "
            "autoscaling the autoscaler owns this field through the scale subresource: leave "
            "it out of manifests applied by GitOps, or they fight over it."
        ),
        ge=0,
        le=1000,
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Autoscaling; when set it owns the replica count."
    )
    server: Server = nested(Server, "Inference server settings.")
    resources: ServingResources = nested(ServingResources, "Compute per replica.")
    rollout: Rollout = nested(Rollout, "Rollout strategy.")
    scheduling: Scheduling = nested(Scheduling, "Placement and priority of the replicas.")


class ServedAdapterStatus(StatusModel):
    """The version of an adapter the replicas are given."""

    name: str = Field(description="The adapter's model name.")
    source: str = Field(description="Its version: `<run>/final`, `<run>/step-<N>` or the uri.")
    uri: str = Field(description="Its folder (`pvc://<claim>/<path>` or a path in the image).")
    rank: int | None = Field(default=None, description="Its LoRA rank, when its run says.", ge=1)
    evaluation: FinalEvaluation | None = Field(
        default=None, description="Its run's final evaluation, what a gate compares with."
    )


class ModelDeploymentStatus(StatusModel):
    """Observed state of a ModelDeployment."""

    phase: Literal["Pending", "Deploying", "Ready", "Failed"] | None = Field(
        default=None, description="Coarse lifecycle phase."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation last acted on.", ge=0
    )
    conditions: list[Condition] = conditions_field()
    replicas: int = Field(
        default=0, description="Replicas that exist (the scale subresource).", ge=0
    )
    ready_replicas: int = Field(default=0, description="Replicas ready to serve.", ge=0)
    updated_replicas: int = Field(
        default=0, description="Replicas running the current spec and model.", ge=0
    )
    selector: str | None = Field(
        default=None, description="Label selector of the replicas (the scale subresource)."
    )
    model: str | None = Field(default=None, description="Model name served.")
    adapters: list[str] | None = Field(
        default=None,
        description="Names of the LoRA adapters served beside the model.",
        max_length=16,
    )
    served_adapters: list[ServedAdapterStatus] | None = Field(
        default=None,
        description="Which version of each adapter is served, and its evaluation.",
        max_length=16,
    )
    checkpoint: str | None = Field(
        default=None, description="Checkpoint being served (`<run>/step-<N>` or the uri)."
    )
    url: str | None = Field(
        default=None, description="In-cluster URL of the OpenAI-compatible API."
    )
    served_run: str | None = Field(
        default=None, description="The TrainingRun whose model is served."
    )
    served_evaluation: FinalEvaluation | None = Field(
        default=None, description="Final evaluation of the served model (what the gate compares)."
    )
    held_back: str | None = Field(
        default=None, description="A newer model the gate held back, and why."
    )


class ModelDeployment(ApiModel):
    """A ModelDeployment custom resource."""

    api_version: Literal["llmops.dev/v1alpha1"] = Field(description="API version.")
    kind: Literal["ModelDeployment"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: ModelDeploymentSpec = Field(description="Desired state.")
    status: ModelDeploymentStatus = Field(
        default_factory=ModelDeploymentStatus, description="Observed state."
    )
