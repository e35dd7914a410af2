"""The operator's configuration: the chart's LLMOPS_* variables read into one typed object,
with a message naming the variable when one is wrong."""

from __future__ import annotations

import pytest

from llmops.config import DEFAULT_TRAINER_IMAGE, OperatorConfig

pytestmark = pytest.mark.unit


def test_defaults_without_variables() -> None:
    config = OperatorConfig.from_env({})
    assert config.trainer_image == DEFAULT_TRAINER_IMAGE
    assert config.spot_tolerations == [] and config.spot_node_selector == {}


def test_the_chart_values_are_read() -> None:
    config = OperatorConfig.from_env(
        {
            "LLMOPS_TRAINER_IMAGE": "registry.local/trainer:1",
            "LLMOPS_SPOT_NODE_SELECTOR": '{"pool": "spot"}',
            "LLMOPS_PROMETHEUS_URL": "http://prometheus:9090",
        }
    )
    assert config.trainer_image == "registry.local/trainer:1"
    assert config.spot_node_selector == {"pool": "spot"}
    assert config.prometheus_url == "http://prometheus:9090"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLMOPS_SPOT_TOLERATIONS": "[{"}, "LLMOPS_SPOT_TOLERATIONS is not valid JSON"),
        ({"LLMOPS_SPOT_NODE_SELECTOR": '["a"]'}, "LLMOPS_SPOT_NODE_SELECTOR"),
        ({"LLMOPS_SPOT_TOLERATIONS": '{"key": 1}'}, "LLMOPS_SPOT_TOLERATIONS"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OperatorConfig.from_env(env)
