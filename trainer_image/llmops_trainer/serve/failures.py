"""Why the server could not start or stopped serving, as the `serve` FailureReport reasons of
the contract: left as the termination message, where the ModelDeployment's Degraded
condition picks it up (a crash-looping pod otherwise says only "Error")."""

from __future__ import annotations

from llmops.api.workload import SERVER_STAGE
from llmops_trainer.serve.loading import ModelFolderError
from llmops_trainer.serve.settings import EmptyTokenError
from llmops_trainer.termination import write_failure


class ServingConfigError(ModelFolderError):
    """Settings this model cannot honour (e.g. a context longer than the model's)."""


class UnsupportedModelError(ModelFolderError):
    """An architecture the built-in engine does not serve."""


class AdapterLoadError(ModelFolderError):
    """A LoRA adapter that does not fit the base model."""


# Most specific first: the subclasses of ModelFolderError before it.
REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (EmptyTokenError, "EmptyAuthToken"),
    (ServingConfigError, "InvalidServingConfig"),
    (UnsupportedModelError, "UnsupportedModel"),
    (AdapterLoadError, "InvalidAdapter"),
    (ModelFolderError, "ModelLoadFailed"),
    (OSError, "ModelLoadFailed"),
)


def failure_reason(error: BaseException) -> str:
    return next((reason for kind, reason in REASONS if isinstance(error, kind)), "ServerFailed")


def report_failure(reason: str, message: str) -> None:
    """Leave the report where the pod's terminationMessagePath points (nothing outside a pod)."""
    write_failure(SERVER_STAGE, reason, message)
