"""TrainingSchedule: retrain on a cron schedule and/or whenever the Dataset gets a new version.

A kind of its own, as CronJob is to Job: a TrainingRun describes one run (step, loss,
checkpoints), while a schedule owns a series of them, each continuing from the checkpoint of
the previous one. A ModelDeployment follows the newest finished run through
`model.trainingSchedule`, behind an evaluation gate.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from llmops.api.base import ApiModel, Rule, StatusModel
from llmops.api.common import Condition, ObjectMeta, conditions_field
from llmops.api.trainingrun import TrainingRunSpec

# Runs are named `<schedule>-<n>`; leave room for the suffix within a TrainingRun name.
MAX_SCHEDULE_NAME = 38
# Five cron fields (minute hour day-of-month month day-of-week) or a macro such as @daily.
CRON = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\S+\s+){4}\S+)$"


class TrainingScheduleSpec(ApiModel):
    """When to start a new TrainingRun, and from what."""

    cel_rules = (
        Rule(
            cel="has(self.schedule) || self.onDatasetChange",
            message="set schedule, onDatasetChange or both",
            check=lambda s: s.schedule is not None or s.on_dataset_change,
            field_path=".schedule",
        ),
    )

    schedule: str | None = Field(
        default=None,
        description=(
            "Cron expression (`0 3 * * 0`: Sundays at 03:00) in timeZone. A time that passes "
            "while a run is still going starts one run once it ends (missed times are not "
            "made up one by one)."
        ),
        max_length=128,
        pattern=CRON,
    )
    time_zone: str = Field(
        default="UTC",
        description="IANA time zone of the schedule (`Europe/Berlin`).",
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_+/-]*$",
    )
    on_dataset_change: bool = Field(
        default=False,
        description=(
            "Start a run whenever the template's Dataset finishes a version whose fingerprint "
            "no run of this schedule has trained on yet."
        ),
    )
    template: TrainingRunSpec = Field(description="Spec of every TrainingRun started.")
    continue_from: Literal["latest", "best", "none"] = Field(
        default="latest",
        description=(
            "Start each run from this checkpoint of the newest succeeded run (continued "
            "pre-training or fine-tuning); `none`: from the template's own init every time."
        ),
    )
    history_limit: int = Field(
        default=3,
        description="Finished runs to keep; older ones are deleted, with their checkpoints.",
        ge=1,
        le=100,
    )
    suspend: bool = Field(default=False, description="Start no new runs while true.")


class TrainingScheduleStatus(StatusModel):
    """Observed state of a TrainingSchedule."""

    phase: Literal["Waiting", "Running", "Suspended", "Failed"] | None = Field(
        default=None, description="Waiting for a trigger, running a run, suspended or failed."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation last acted on.", ge=0
    )
    conditions: list[Condition] = conditions_field()
    active: str | None = Field(default=None, description="The run in progress, if any.")
    last_run: str | None = Field(default=None, description="The newest run started.")
    last_succeeded_run: str | None = Field(
        default=None, description="The newest run that finished training (what is served)."
    )
    last_trigger: str | None = Field(
        default=None, description="What started the newest run: `schedule` or `dataset-change`."
    )
    last_schedule_time: datetime | None = Field(
        default=None, description="The cron time the newest scheduled run was started for."
    )
    next_schedule_time: datetime | None = Field(default=None, description="The next cron time.")
    last_dataset_fingerprint: str | None = Field(
        default=None, description="Fingerprint of the Dataset version the newest run trains on."
    )
    runs: int | None = Field(default=None, description="Runs of this schedule that exist.", ge=0)


class TrainingSchedule(ApiModel):
    """A TrainingSchedule custom resource."""

    cel_rules = (
        Rule(
            cel=f"size(self.metadata.name) <= {MAX_SCHEDULE_NAME}",
            message=f"a TrainingSchedule name has at most {MAX_SCHEDULE_NAME} characters "
            "(its runs are named <name>-<n>)",
            check=lambda s: len(s.metadata.name) <= MAX_SCHEDULE_NAME,
            field_path=".metadata.name",
        ),
    )

    api_version: Literal["llmops.dev/v1alpha1"] = Field(description="API version.")
    kind: Literal["TrainingSchedule"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: TrainingScheduleSpec = Field(description="Desired state.")
    status: TrainingScheduleStatus = Field(
        default_factory=TrainingScheduleStatus, description="Observed state."
    )
