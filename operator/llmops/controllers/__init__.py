"""kopf handlers, one module per kind. Importing this package registers them all:
`kopf run -m llmops.controllers` or `llmops operator`."""

from llmops.controllers import (
    dataset,
    modeldeployment,
    settings,
    sweep,
    trainingrun,
    trainingschedule,
)

__all__ = ["dataset", "modeldeployment", "settings", "sweep", "trainingrun", "trainingschedule"]
