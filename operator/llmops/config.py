"""How the operator was configured (the Helm values, passed as LLMOPS_* variables): one
typed object, read and validated once, instead of environment lookups scattered through the
builders. A bad value (spot tolerations that are not JSON, say) stops the operator at start
with a message naming the variable, not at the first pod it builds.

`llmops operator` and the local runtime call `current()`; tests use `configure(...)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmops import __version__

DEFAULT_TRAINER_IMAGE = f"ghcr.io/llmops/trainer:{__version__}"
VLLM_VERSION = "0.33.0"
DEFAULT_VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"

# variable -> field (JSON-valued variables are parsed)
VARIABLES = {
    "LLMOPS_TRAINER_IMAGE": "trainer_image",
    "LLMOPS_VLLM_IMAGE": "vllm_image",
    "LLMOPS_SPOT_TOLERATIONS": "spot_tolerations",
    "LLMOPS_SPOT_NODE_SELECTOR": "spot_node_selector",
    "LLMOPS_PROMETHEUS_URL": "prometheus_url",
}
JSON_FIELDS = frozenset({"spot_tolerations", "spot_node_selector"})


class OperatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trainer_image: str = Field(
        default=DEFAULT_TRAINER_IMAGE,
        min_length=1,
        description="Image of data, training and serving pods whose spec names none.",
    )
    vllm_image: str = Field(
        default=DEFAULT_VLLM_IMAGE, min_length=1, description="Image of runtime vllm servers."
    )
    spot_tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Tolerations `scheduling.spot` adds; empty means the GKE/AKS/EKS ones.",
    )
    spot_node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels `scheduling.spot` requires."
    )
    prometheus_url: str = Field(
        default=DEFAULT_PROMETHEUS,
        min_length=1,
        description="Prometheus that KEDA ScaledObjects query, unless a spec names one.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        values: dict[str, Any] = {}
        for variable, name in VARIABLES.items():
            raw = env.get(variable)
            if not raw:
                continue
            try:
                values[name] = json.loads(raw) if name in JSON_FIELDS else raw
            except ValueError as error:
                raise ValueError(f"{variable} is not valid JSON: {error}") from error
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            names = {field: variable for variable, field in VARIABLES.items()}
            problems = "; ".join(
                f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in error.errors()
            )
            raise ValueError(f"invalid operator configuration: {problems}") from error


_current: OperatorConfig | None = None


def current() -> OperatorConfig:
    """The configuration of this process (read from the environment on first use)."""
    global _current
    if _current is None:
        _current = OperatorConfig.from_env()
    return _current


def configure(config: OperatorConfig | None) -> None:
    """Set the configuration (None: read the environment again on next use)."""
    global _current
    _current = config
