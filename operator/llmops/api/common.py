"""Types shared by the three kinds: names, references, resources, scheduling, storage,
conditions and object metadata."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from llmops.api.base import ApiModel, Rule, StatusModel, cel_exactly_one, exactly_one

# RFC 1123 label: the names of most Kubernetes objects a spec can refer to.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# RFC 1035 label: our own objects' names become Service names, which must start with a letter.
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# Room for the suffixes of child objects (`<name>-headless`, `<name>-workers-0`, ...).
MAX_NAME_LENGTH = 45
# A file path inside a container image; relative paths start at the image's working folder.
FILE_PATH = r"^[^\x00]+$"
# resource.Quantity, as the core API writes it ("500m", "2Gi", "1.5", 4).
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)

Name = Annotated[str, StringConstraints(pattern=DNS_LABEL, max_length=63)]
# Label keys and values as the API server checks them on pods ([prefix/]name; value up to 63).
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_VALUE = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY, max_length=316)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE, max_length=63)]
INT32_MAX = 2**31 - 1
Path = Annotated[str, StringConstraints(pattern=FILE_PATH, max_length=4096)]
Quantity = Annotated[
    str,
    BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v),
    StringConstraints(pattern=QUANTITY, max_length=64),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY,
            "x-kubernetes-int-or-string": True,
        }
    ),
]
# Free-form objects handed on untouched (a core/v1 Affinity, a DeepSpeed config overlay).
FreeForm = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace."""

    name: Name = Field(description="Name of the referenced object, in the same namespace.")


class SecretKeySelector(ApiModel):
    """A key of a Secret in the same namespace."""

    name: Name = Field(description="Name of the Secret, in the same namespace.")
    key: str = Field(
        description="Key inside the Secret.",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
    )


class S3Location(ApiModel):
    """A bucket and prefix in an S3-compatible object store."""

    bucket: str = Field(
        description="Bucket name.",
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
    )
    prefix: str = Field(
        default="",
        description="Key prefix inside the bucket (a folder, e.g. `corpora/wiki/`).",
        max_length=1024,
    )
    endpoint: str | None = Field(
        default=None,
        description=(
            "Endpoint URL of an S3-compatible store (MinIO, Ceph, GCS); unset means AWS S3."
        ),
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
    )
    region: str | None = Field(
        default=None, description="Region of the bucket.", max_length=63, pattern=r"^[a-z0-9-]+$"
    )
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret holding `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`; unset means the "
            "pod's own identity (IRSA, workload identity)."
        ),
    )


# Where an open-weights model in Hugging Face format lives.
MODEL_URI = (
    r"^(/[^\s]*|pvc://[a-z0-9][-a-z0-9.]*(/[^\s]*)?|s3://[a-z0-9][-a-z0-9.]*[a-z0-9](/[^\s]*)?"
    r"|https://[^\s]+|hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*(@[^\s/]+)?)$"
)


class ModelFile(ApiModel):
    """One file of a model published over HTTPS, with the digest it must have."""

    name: str = Field(
        description="File name relative to the URI (`config.json`, `model.safetensors`).",
        min_length=1,
        max_length=512,
        pattern=r"^[A-Za-z0-9_][-A-Za-z0-9_.]*(/[A-Za-z0-9_][-A-Za-z0-9_.]*)*$",
    )
    sha256: str = Field(
        description="Expected SHA-256 of the file, lowercase hex.", pattern=r"^[0-9a-f]{64}$"
    )


class PretrainedModel(ApiModel):
    """An open-weights model in Hugging Face format (config.json, safetensors, tokenizer)."""

    cel_rules = (
        Rule(
            cel="!self.uri.startsWith('https://') || (has(self.files) && size(self.files) > 0)",
            message="an https:// model lists its files with their sha256",
            check=lambda s: not s.uri.startswith("https://") or bool(s.files),
            field_path=".files",
        ),
        Rule(
            cel="self.uri.startsWith('https://') || !has(self.files) || size(self.files) == 0",
            message="files applies only to an https:// model",
            check=lambda s: s.uri.startswith("https://") or not s.files,
            field_path=".files",
        ),
        Rule(
            cel="!has(self.endpoint) || self.uri.startsWith('s3://') || "
            "self.uri.startsWith('hf://')",
            message="endpoint applies to s3:// (an S3-compatible store) and hf:// (a mirror)",
            check=lambda s: s.endpoint is None or s.uri.startswith(("s3://", "hf://")),
            field_path=".endpoint",
        ),
    )

    uri: str = Field(
        description=(
            "Where the model is: an absolute path in the image, `pvc://<claim>/<path>`, "
            "`s3://<bucket>/<prefix>`, `https://<base URL>` (with files) or "
            "`hf://<org>/<name>[@<revision>]` (the Hugging Face Hub or a mirror). Remote "
            "models are downloaded once into the run's storage, verified, and reused."
        ),
        max_length=4096,
        pattern=MODEL_URI,
    )
    files: list[ModelFile] = Field(
        default_factory=list,
        description="The files of an `https://` model and their SHA-256 (required there).",
        max_length=256,
    )
    endpoint: str | None = Field(
        default=None,
        description=(
            "Endpoint of an S3-compatible store for `s3://`, or a Hub mirror for `hf://` "
            "(as `HF_ENDPOINT`); unset means AWS S3 or the operator's `HF_ENDPOINT`."
        ),
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
    )
    credentials_secret: LocalObjectReference | None = Field(
        default=None,
        description=(
            "Secret holding `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (s3://) or "
            "`HF_TOKEN` (hf://, gated models); referenced, never copied."
        ),
    )


class VolumeStorage(ApiModel):
    """A PersistentVolumeClaim: an existing one, or a new one the operator creates."""

    cel_rules = (
        Rule(
            cel="has(self.claimName) != has(self.size)",
            message="set either claimName (an existing claim) or size (a new claim)",
            check=lambda s: (s.claim_name is None) != (s.size is None),
        ),
        Rule(
            cel="!has(self.storageClassName) || has(self.size)",
            message="storageClassName applies only to a new claim (with size)",
            check=lambda s: s.storage_class_name is None or s.size is not None,
            field_path=".storageClassName",
        ),
    )

    claim_name: Name | None = Field(
        default=None, description="Name of an existing PersistentVolumeClaim to use."
    )
    size: Quantity | None = Field(
        default=None,
        description="Size of a new claim the operator creates (owned by this resource).",
    )
    storage_class_name: str | None = Field(
        default=None,
        description="StorageClass of the new claim; unset means the cluster default.",
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    sub_path: str | None = Field(
        default=None,
        description="Folder inside the volume; unset means the volume root.",
        max_length=1024,
        pattern=r"^[^/\x00][^\x00]*$",
    )


class Storage(ApiModel):
    """Where files are written: a volume or an object store (exactly one)."""

    cel_rules = (
        Rule(
            cel=cel_exactly_one("volume", "s3"),
            message="exactly one of volume or s3 must be set",
            check=lambda s: exactly_one(s, "volume", "s3"),
        ),
    )

    volume: VolumeStorage | None = Field(default=None, description="A PersistentVolumeClaim.")
    s3: S3Location | None = Field(default=None, description="An S3-compatible bucket and prefix.")


class Resources(ApiModel):
    """Compute for each pod."""

    cpu: Quantity | None = Field(
        default=None, description="CPU request and limit per pod (e.g. `2`, `500m`)."
    )
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit per pod (e.g. `8Gi`)."
    )
    image: str | None = Field(
        default=None,
        description=(
            "Container image; unset means the trainer image the operator is configured with."
        ),
        max_length=512,
        pattern=r"^[^\s]+$",
    )


class Toleration(ApiModel):
    """A core/v1 Toleration, copied to the pods."""

    key: LabelKey | None = Field(
        default=None,
        description="Taint key to tolerate; unset with Exists matches every taint.",
    )
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="`Equal` matches key and value; `Exists` only the key."
    )
    value: LabelValue | None = Field(default=None, description="Taint value to match (with Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; unset matches every effect."
    )
    toleration_seconds: int | None = Field(
        default=None,
        description="How long a NoExecute taint is tolerated before eviction.",
        ge=0,
        le=INT32_MAX,
    )


class Scheduling(ApiModel):
    """Where and with what priority the pods run."""

    cel_rules = (
        Rule(
            # CRD schemas cannot constrain map keys; CEL can (what the pods' API checks).
            cel=f"self.nodeSelector.all(k, size(k) <= 316 && k.matches('{LABEL_KEY}'))",
            message="nodeSelector keys must be label keys ([prefix/]name)",
            check=lambda s: all(len(k) <= 316 and re.match(LABEL_KEY, k) for k in s.node_selector),
            field_path=".nodeSelector",
        ),
    )

    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        description="Node labels the pods require.",
        max_length=32,
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Taints the pods tolerate.",
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
    )
    affinity: FreeForm | None = Field(
        default=None, description="A core/v1 Affinity, copied to the pods unchanged."
    )
    priority_class_name: str | None = Field(
        default=None,
        description="PriorityClass of the pods (preemption order).",
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    spot: bool = Field(
        default=False,
        description=(
            "Allow spot/preemptible nodes: the pods tolerate the usual spot taints and the "
            "workload expects to be preempted (training resumes from its latest checkpoint)."
        ),
    )
    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue to admit the pods through (`kueue.x-k8s.io/queue-name`).",
        max_length=63,
        pattern=DNS_LABEL,
    )


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """One aspect of the resource's state, shaped like metav1.Condition."""

    type: str = Field(
        description="Condition type in CamelCase (`Ready`, `Complete`, `Available`, ...).",
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
    )
    status: ConditionStatus = Field(description="`True`, `False` or `Unknown`.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was set for.", ge=0
    )
    last_transition_time: datetime = Field(description="When the condition last changed status.")
    reason: str = Field(
        description="A CamelCase, machine-readable reason for the last transition.",
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
    )
    message: str = Field(
        default="", description="A human-readable explanation of the transition.", max_length=32768
    )


def conditions_field() -> Any:
    return Field(
        default_factory=list,
        description="The latest observations of the resource's state, one per type.",
        max_length=32,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


class ObjectMeta(ApiModel):
    """The parts of metav1.ObjectMeta this API reads; the API server owns the rest."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        description=(
            f"Name of the resource: a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            "(child objects append suffixes to it)."
        ),
        max_length=MAX_NAME_LENGTH,
        pattern=DNS_1035_LABEL,
    )
    namespace: str | None = Field(default=None, description="Namespace of the resource.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")
    generation: int | None = Field(default=None, description="Generation of the spec.")
    uid: str | None = Field(default=None, description="Unique id of the resource.")
