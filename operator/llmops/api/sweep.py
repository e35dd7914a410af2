"""Sweep: a hyperparameter search whose trials are TrainingRuns.

A separate kind rather than a `sweep` section in TrainingRun: a TrainingRun's status
describes one run (its step, loss and checkpoints), while a sweep has many trials, a
leaderboard and a best trial, and a lifecycle of its own (it succeeds when its trial budget
is spent, not when one model finished training). Katib draws the same line with its
Experiment kind, and users who know Katib expect it. Each trial is an ordinary TrainingRun
owned by the Sweep, so everything that works for a TrainingRun (kubectl, dashboards,
ModelDeployment serving its checkpoint) works for a trial.

`parameters[].path` names a field of the trial TrainingRun's spec by its dotted camelCase path
(`hyperparameters.learningRate`). The paths a sweep may tune are enumerated from
`TrainingRunSpec` itself (`TUNABLE_PATHS`), so the CRD lists them as an enum and the API server
rejects an unknown path at admission, naming the field.
"""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    JsonValue,
    StringConstraints,
    field_validator,
)

from llmops.api.base import ApiModel, Rule, StatusModel, nested
from llmops.api.common import Condition, ObjectMeta, conditions_field
from llmops.api.trainingrun import MAX_FOLDS, TrainingRunSpec

ParameterType = Literal["categorical", "int", "float", "log-uniform"]
Scalar = type[int] | type[float] | type[bool] | type[str]
# Longest suffix a trial name gets: `-trial-499` (maxTrials is at most 500).
MAX_TRIALS = 500
MAX_SWEEP_NAME_LENGTH = 35
# With crossValidation the runs append -trial-<index>-fold-<fold> (folds are at most 20).
MAX_CV_SWEEP_NAME_LENGTH = 27
# Per trial; with MAX_TRIALS this keeps the status well under etcd's 1.5 MB object limit.
MAX_INTERMEDIATE_VALUES = 30
LEADERBOARD_SIZE = 10
# Fields a sweep does not tune: the Dataset (immutable per run), suspend (the sweep's own
# lever for stopping trials) and crossValidation (set by the sweep's own crossValidation).
_NOT_TUNABLE = ("datasetRef", "suspend", "crossValidation")


def _scalar(annotation: Any) -> Scalar | None:
    """The wire type of a scalar field (Literal members are strings), else None."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _scalar(get_args(annotation)[0])
    if origin is Literal:
        return str
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _scalar(members[0]) if len(members) == 1 else None
    if annotation in (int, float, bool, str):
        return typing.cast(Scalar, annotation)
    return None


def _model(annotation: Any) -> type[BaseModel] | None:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        return _model(members[0]) if len(members) == 1 else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _tunable(model: type[BaseModel], prefix: str = "") -> dict[str, Scalar]:
    found: dict[str, Scalar] = {}
    for name, info in model.model_fields.items():
        wire = info.alias or name
        path = prefix + wire
        if path in _NOT_TUNABLE:
            continue
        scalar = _scalar(info.annotation)
        sub = _model(info.annotation)
        if scalar is not None:
            found[path] = scalar
        elif sub is not None:
            found.update(_tunable(sub, path + "."))
    return found


# Every scalar field of a TrainingRun spec, by dotted camelCase path, with its type.
TUNABLE_PATHS: dict[str, Scalar] = _tunable(TrainingRunSpec)


def convert(path: str, value: str | float) -> int | float | bool | str:
    """A parameter value (categorical values are written as strings, as in Katib) as the
    type of the field at `path`. Raises ValueError when it does not fit that type."""
    target = TUNABLE_PATHS[path]
    if target is bool:
        text = str(value).lower()
        if text not in ("true", "false"):
            raise ValueError(f"{value!r} is not a boolean (true or false)")
        return text == "true"
    if target is int:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    if target is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    return str(value)


def _paths_of(kind: Scalar) -> list[str]:
    return sorted(path for path, scalar in TUNABLE_PATHS.items() if scalar is kind)


def _cel_list(values: list[str]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


INT_PATHS = _paths_of(int)
FLOAT_PATHS = _paths_of(float)


ParameterName = Annotated[
    str, StringConstraints(pattern=r"^[a-zA-Z][a-zA-Z0-9_-]*$", max_length=63)
]


class Parameter(ApiModel):
    """One searched parameter: a field of the trial spec and the space of its values."""

    cel_rules = (
        Rule(
            cel="(self.type == 'categorical') == has(self.values)",
            message="values is required for type categorical and allowed only there",
            check=lambda p: (p.type == "categorical") == (p.values is not None),
            field_path=".values",
        ),
        Rule(
            cel="self.type == 'categorical' ? !has(self.min) && !has(self.max) : "
            "has(self.min) && has(self.max)",
            message="min and max are required for int, float and log-uniform, "
            "and not allowed for categorical",
            check=lambda p: (
                (p.min is None and p.max is None)
                if p.type == "categorical"
                else (p.min is not None and p.max is not None)
            ),
            field_path=".min",
        ),
        Rule(
            cel="!has(self.min) || !has(self.max) || self.min <= self.max",
            message="min must not exceed max",
            check=lambda p: p.min is None or p.max is None or p.min <= p.max,
            field_path=".min",
        ),
        Rule(
            cel="self.type != 'log-uniform' || !has(self.min) || self.min > 0.0",
            message="min must be greater than 0 for type log-uniform",
            check=lambda p: p.type != "log-uniform" or p.min is None or p.min > 0,
            field_path=".min",
        ),
        Rule(
            cel="self.type != 'int' || !has(self.min) || !has(self.max) || "
            "(self.min == double(int(self.min)) && self.max == double(int(self.max)))",
            message="min and max must be whole numbers for type int",
            check=lambda p: (
                p.type != "int"
                or p.min is None
                or p.max is None
                or (float(p.min).is_integer() and float(p.max).is_integer())
            ),
            field_path=".min",
        ),
        Rule(
            cel=f"self.type != 'int' || self.path in {_cel_list(INT_PATHS)}",
            message="type int needs an integer field as path; use categorical for others",
            check=lambda p: p.type != "int" or p.path in INT_PATHS,
            field_path=".type",
        ),
        Rule(
            cel="!(self.type in ['float', 'log-uniform']) || "
            f"self.path in {_cel_list(FLOAT_PATHS)}",
            message=(
                "types float and log-uniform need a floating-point field as path; "
                "use int or categorical for others"
            ),
            check=lambda p: p.type not in ("float", "log-uniform") or p.path in FLOAT_PATHS,
            field_path=".type",
        ),
        Rule(
            cel="!has(self.step) || self.type == 'int'",
            message="step applies to type int only",
            check=lambda p: p.step is None or p.type == "int",
            field_path=".step",
        ),
        Rule(
            cel="!has(self.gridPoints) || self.type == 'float' || self.type == 'log-uniform'",
            message="gridPoints applies to types float and log-uniform only",
            check=lambda p: p.grid_points is None or p.type in ("float", "log-uniform"),
            field_path=".gridPoints",
        ),
    )

    name: ParameterName = Field(
        description="Name of the parameter in the status and leaderboard (e.g. `lr`)."
    )
    path: str = Field(
        description=(
            "The trial spec field it sets, as a dotted camelCase path into the TrainingRun "
            "spec (`hyperparameters.learningRate`, `model.numLayers`)."
        ),
        json_schema_extra={"enum": list[JsonValue](sorted(TUNABLE_PATHS))},
    )
    type: ParameterType = Field(
        description=(
            "`categorical`: one of `values`; `int`: an integer from `min` to `max` (every "
            "`step`-th); `float`: uniform from `min` to `max`; `log-uniform`: uniform in "
            "log space from `min` (> 0) to `max`."
        )
    )
    min: float | None = Field(default=None, description="Lower bound (inclusive).")
    max: float | None = Field(default=None, description="Upper bound (inclusive).")
    values: list[Annotated[str, StringConstraints(max_length=253)]] | None = Field(
        default=None,
        description=(
            'The choices of a categorical parameter, written as strings (`"0.001"`, '
            '`"cosine"`, `"true"`) and converted to the field\'s type.'
        ),
        min_length=1,
        max_length=100,
    )
    step: int | None = Field(
        default=None, description="Spacing of int values (default 1).", ge=1, le=1_000_000
    )
    grid_points: int | None = Field(
        default=None,
        description=(
            "Grid search only: evenly spaced (log-spaced for log-uniform) points from min "
            "to max (default 3)."
        ),
        ge=2,
        le=100,
    )

    @field_validator("path")
    @classmethod
    def _known_path(cls, path: str) -> str:
        if path not in TUNABLE_PATHS:
            raise ValueError(
                f"path: {path!r} is not a field of the TrainingRun spec that can be tuned "
                "(e.g. hyperparameters.learningRate, model.numLayers)"
            )
        return path

    def choices(self) -> list[int | float | bool | str]:
        """The categorical values as the field's type."""
        return [convert(self.path, v) for v in self.values or []]


def _fits_field(parameter: Parameter) -> Parameter:
    """Categorical values convert to the field's type (the CRD schema cannot check this:
    the operator reports it as an InvalidSpec failure)."""
    if parameter.type == "categorical":
        try:
            parameter.choices()
        except ValueError as error:
            where = f"parameter {parameter.name!r} ({parameter.path})"
            raise ValueError(f"values: {where}: {error}") from None
    return parameter


class Objective(ApiModel):
    """What the sweep optimizes: a metric of each succeeded trial's status.metrics."""

    metric: Literal["validationLoss", "perplexity", "accuracy", "trainLoss"] = Field(
        default="validationLoss", description="The trial TrainingRun's status.metrics field."
    )
    direction: Literal["minimize", "maximize"] = Field(
        default="minimize", description="Whether lower or higher values are better."
    )


class SweepEarlyStopping(ApiModel):
    """Stop trials that are doing worse than the others at the same step."""

    rule: Literal["median"] = Field(
        default="median",
        description=(
            "`median`: stop a running trial whose best objective so far is worse than the "
            "median of the other trials' best values up to the same step."
        ),
    )
    min_trials: int = Field(
        default=3,
        description="Other trials that must have reached the step before a trial is stopped.",
        ge=1,
        le=MAX_TRIALS,
    )
    start_step: int = Field(
        default=0, description="No trial is stopped before this step.", ge=0, le=100_000_000
    )


class Budget(ApiModel):
    """Limits on the whole sweep; reaching one ends it (condition Complete, reason
    BudgetExhausted) and suspends the trials still running, keeping their checkpoints."""

    cel_rules = (
        Rule(
            cel="has(self.maxAcceleratorHours) || has(self.maxWallTimeSeconds)",
            message="set maxAcceleratorHours or maxWallTimeSeconds",
            check=lambda b: (
                b.max_accelerator_hours is not None or b.max_wall_time_seconds is not None
            ),
        ),
    )

    max_accelerator_hours: float | None = Field(
        default=None,
        description="Sum of the trials' status.acceleratorHours at which the sweep stops.",
        gt=0,
    )
    max_wall_time_seconds: int | None = Field(
        default=None, description="Seconds after the sweep started at which it stops.", ge=1
    )


class SweepCrossValidation(ApiModel):
    """k-fold cross-validation of every trial: a trial is k TrainingRuns on the k folds of the
    Dataset's training split, and its value the mean of their objective values."""

    folds: int = Field(
        description="Number of folds k (TrainingRuns per trial).", ge=2, le=MAX_FOLDS
    )


def _distinct_names(parameters: list[Parameter]) -> list[Parameter]:
    names = [p.name for p in parameters]
    paths = [p.path for p in parameters]
    if len(set(names)) != len(names):
        raise ValueError(f"name: parameter names must be distinct, got {names}")
    if len(set(paths)) != len(paths):
        raise ValueError(f"path: each path may be searched once, got {paths}")
    return parameters


class SweepSpec(ApiModel):
    """Desired state of a Sweep."""

    cel_rules = (
        Rule(
            cel="self.parameters.all(p, self.parameters.exists_one(q, q.path == p.path))",
            message="each path may be searched by one parameter only",
            check=lambda s: len({p.path for p in s.parameters}) == len(s.parameters),
            field_path=".parameters",
        ),
        Rule(
            cel="size(self.parameters) > 0 || has(self.crossValidation)",
            message="parameters needs at least one parameter (or set crossValidation to "
            "cross-validate the template alone)",
            check=lambda s: bool(s.parameters) or s.cross_validation is not None,
            field_path=".parameters",
        ),
        Rule(
            cel="!has(self.earlyStopping) || !has(self.crossValidation)",
            message="earlyStopping cannot be combined with crossValidation (a trial's value "
            "is the mean over its folds, known only when they all finished)",
            check=lambda s: s.early_stopping is None or s.cross_validation is None,
            field_path=".earlyStopping",
        ),
    )

    template: TrainingRunSpec = Field(
        description="The spec of every trial TrainingRun, before the parameters are applied."
    )
    parameters: Annotated[
        list[Annotated[Parameter, AfterValidator(_fits_field)]],
        AfterValidator(_distinct_names),
    ] = Field(
        default_factory=list,
        description=(
            "The searched parameters; may be empty with crossValidation (one trial: plain "
            "k-fold cross-validation of the template)."
        ),
        max_length=20,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    algorithm: Literal["grid", "random", "tpe"] = Field(
        default="tpe",
        description=(
            "`grid`: every combination in order (maxTrials is capped at the grid size); "
            "`random`: independent draws, reproducible from seed and trial index; `tpe`: "
            "Optuna's Tree-structured Parzen Estimator, learning from finished trials."
        ),
    )
    seed: int = Field(default=0, description="Seed of random and tpe.", ge=0, le=4294967295)
    objective: Objective = nested(Objective, "The metric to optimize and its direction.")
    max_trials: int = Field(default=10, description="Trials to run in all.", ge=1, le=MAX_TRIALS)
    parallel_trials: int = Field(
        default=1,
        description=(
            "Trials pending or running at the same time; with crossValidation, TrainingRuns "
            "(folds) pending or running at the same time."
        ),
        ge=1,
        le=100,
    )
    max_failed_trials: int = Field(
        default=3, description="Failed trials at which the sweep fails.", ge=1, le=MAX_TRIALS
    )
    early_stopping: SweepEarlyStopping | None = Field(
        default=None, description="Stop trials that fall behind; unset runs every trial to its end."
    )
    budget: Budget | None = Field(
        default=None, description="Accelerator-hour and wall-time limits of the whole sweep."
    )
    cross_validation: SweepCrossValidation | None = Field(
        default=None,
        description=(
            "k-fold cross-validation: each trial runs as k TrainingRuns "
            "`<sweep>-trial-<index>-fold-<fold>` (the template, the trial's parameters and "
            "`crossValidation: {folds: k, fold: <fold>}`); a trial succeeds when all its folds "
            "did, fails when one failed, and its value is the mean of the folds' objective "
            "values (with their standard deviation in the trial record). Not with "
            "earlyStopping."
        ),
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "crossValidation is immutable"}
            ]
        },
    )
    suspend: bool = Field(
        default=False,
        description="Suspend the running trials (keeping checkpoints) and start no new ones.",
    )


TrialState = Literal["Pending", "Running", "Succeeded", "Failed", "Pruned", "Suspended"]
ParameterValues = dict[str, str]


class TrialCounts(StatusModel):
    """Trials by state."""

    pending: int = Field(default=0, description="Created, not running yet.", ge=0)
    running: int = Field(default=0, description="Running.", ge=0)
    succeeded: int = Field(default=0, description="Finished training.", ge=0)
    failed: int = Field(default=0, description="Failed.", ge=0)
    pruned: int = Field(default=0, description="Stopped early by the early-stopping rule.", ge=0)
    suspended: int = Field(default=0, description="Suspended with the sweep.", ge=0)
    finished: int = Field(default=0, description="Succeeded, failed or pruned.", ge=0)


class IntermediateValue(StatusModel):
    """The objective as a running trial reported it at one step."""

    step: int = Field(description="Optimizer step.", ge=0)
    value: float = Field(description="Objective value at that step.")


class TrialRecord(StatusModel):
    """One trial as the sweep sees it."""

    name: str = Field(description="Name of the trial TrainingRun.")
    index: int = Field(description="Trial index (0 for the first).", ge=0)
    state: TrialState = Field(description="Trial state.")
    parameters: ParameterValues = Field(
        default_factory=dict, description="Parameter values by name."
    )
    value: float | None = Field(
        default=None,
        description="Final objective value (with crossValidation: the mean over the folds).",
    )
    folds: list[float] | None = Field(
        default=None,
        description=(
            "crossValidation: the objective values of the folds that succeeded, in fold "
            "order (all k once the trial succeeded)."
        ),
        max_length=MAX_FOLDS,
    )
    stdev: float | None = Field(
        default=None,
        description="crossValidation: sample standard deviation of the folds' values.",
        ge=0,
    )
    intermediate: list[IntermediateValue] = Field(
        default_factory=list,
        description=f"Objective values observed while running (at most {MAX_INTERMEDIATE_VALUES}).",
        max_length=MAX_INTERMEDIATE_VALUES,
    )


class BestTrial(StatusModel):
    """The succeeded trial with the best objective value."""

    name: str = Field(description="Name of the trial TrainingRun.")
    index: int = Field(description="Trial index.", ge=0)
    parameters: ParameterValues = Field(
        default_factory=dict, description="Parameter values by name."
    )
    value: float = Field(
        description="Objective value (with crossValidation: the mean over the folds)."
    )
    stdev: float | None = Field(
        default=None,
        description="crossValidation: sample standard deviation of the folds' values.",
        ge=0,
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description=(
            "Its best checkpoint (or final model) to deploy or continue; unset with "
            "crossValidation (each fold's model saw only part of the data: train one "
            "TrainingRun with the best parameters)."
        ),
    )


class LeaderboardEntry(StatusModel):
    """A trial on the leaderboard."""

    name: str = Field(description="Name of the trial TrainingRun.")
    parameters: ParameterValues = Field(
        default_factory=dict, description="Parameter values by name."
    )
    value: float = Field(description="Objective value (final, or best so far when pruned).")
    stdev: float | None = Field(
        default=None,
        description="crossValidation: sample standard deviation of the folds' values.",
        ge=0,
    )
    state: TrialState = Field(description="Trial state.")


class SweepStatus(StatusModel):
    """Observed state of a Sweep."""

    phase: Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"] | None = Field(
        default=None, description="Coarse lifecycle phase."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation last acted on.", ge=0
    )
    conditions: list[Condition] = conditions_field()
    start_time: datetime | None = Field(default=None, description="When the sweep started.")
    completion_time: datetime | None = Field(default=None, description="When the sweep ended.")
    trials: TrialCounts | None = Field(default=None, description="Trials by state.")
    accelerator_hours: float | None = Field(
        default=None, description="Accelerator hours used by all trials so far.", ge=0
    )
    best_trial: BestTrial | None = Field(default=None, description="The best trial so far.")
    leaderboard: list[LeaderboardEntry] = Field(
        default_factory=list,
        description=f"The best {LEADERBOARD_SIZE} trials with a value, best first.",
        max_length=LEADERBOARD_SIZE,
    )
    trial_records: list[TrialRecord] = Field(
        default_factory=list,
        description="Every trial, by index.",
        max_length=MAX_TRIALS,
    )


class Sweep(ApiModel):
    """A Sweep custom resource."""

    cel_rules = (
        Rule(
            cel=f"size(self.metadata.name) <= {MAX_SWEEP_NAME_LENGTH}",
            message=(
                f"metadata.name must be at most {MAX_SWEEP_NAME_LENGTH} characters "
                "(trial names append -trial-<index>)"
            ),
            check=lambda s: len(s.metadata.name) <= MAX_SWEEP_NAME_LENGTH,
            field_path=".metadata.name",
        ),
        Rule(
            cel="!has(self.spec.crossValidation) || "
            f"size(self.metadata.name) <= {MAX_CV_SWEEP_NAME_LENGTH}",
            message=(
                f"metadata.name must be at most {MAX_CV_SWEEP_NAME_LENGTH} characters with "
                "spec.crossValidation (run names append -trial-<index>-fold-<fold>)"
            ),
            check=lambda s: (
                s.spec.cross_validation is None or len(s.metadata.name) <= MAX_CV_SWEEP_NAME_LENGTH
            ),
            field_path=".metadata.name",
        ),
    )

    api_version: Literal["llmops.dev/v1alpha1"] = Field(description="API version.")
    kind: Literal["Sweep"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: SweepSpec = Field(description="Desired state.")
    status: SweepStatus = Field(default_factory=SweepStatus, description="Observed state.")
