"""The llmops API: spec and status of Dataset, TrainingRun, ModelDeployment and the kinds
that automate them (TrainingSchedule, Sweep).

These pydantic models are the single source of truth: the CRDs in crds/ are generated from
them (`llmops crds`), the operator and the local runtime parse resources with them, and the
trainer image reads its job configuration through them. This package imports nothing heavier
than pydantic, so every one of those can import it.
"""

from llmops import GROUP, VERSION
from llmops.api.base import ApiModel, Rule
from llmops.api.common import Condition, ObjectMeta
from llmops.api.dataset import Dataset, DatasetSpec, DatasetStatus
from llmops.api.modeldeployment import (
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
)
from llmops.api.sweep import Sweep, SweepSpec, SweepStatus
from llmops.api.trainingrun import TrainingRun, TrainingRunSpec, TrainingRunStatus
from llmops.api.trainingschedule import (
    TrainingSchedule,
    TrainingScheduleSpec,
    TrainingScheduleStatus,
)

API_VERSION = f"{GROUP}/{VERSION}"

KINDS: dict[
    str,
    type[Dataset]
    | type[TrainingRun]
    | type[ModelDeployment]
    | type[TrainingSchedule]
    | type[Sweep],
] = {
    "Dataset": Dataset,
    "TrainingRun": TrainingRun,
    "ModelDeployment": ModelDeployment,
    "TrainingSchedule": TrainingSchedule,
    "Sweep": Sweep,
}

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "ApiModel",
    "Condition",
    "Dataset",
    "DatasetSpec",
    "DatasetStatus",
    "ModelDeployment",
    "ModelDeploymentSpec",
    "ModelDeploymentStatus",
    "ObjectMeta",
    "Rule",
    "Sweep",
    "SweepSpec",
    "SweepStatus",
    "TrainingRun",
    "TrainingRunSpec",
    "TrainingRunStatus",
    "TrainingSchedule",
    "TrainingScheduleSpec",
    "TrainingScheduleStatus",
]
