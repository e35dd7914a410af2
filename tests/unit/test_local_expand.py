from __future__ import annotations

import pytest

from llmops.local.expand import command_line, expand, field_value, resolve_env


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("--x=$(A)/$(B)", "--x=1/two"),
        ("$$(A)", "$(A)"),  # escaped
        ("$$$(A)", "$1"),
        ("$(MISSING)", "$(MISSING)"),  # undefined stays as written
        ("$(A", "$(A"),  # unterminated
        ("cost $5", "cost $5"),
        ("trailing $", "trailing $"),
        ("$()", "$()"),
        ("", ""),
    ],
)
def test_expand_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "two"}) == expected


def test_env_values_see_only_earlier_variables_and_field_refs() -> None:
    container = {
        "env": [
            {"name": "LATER_REF", "value": "$(B)"},
            {"name": "A", "value": "a"},
            {"name": "B", "value": "$(A)-b"},
            {
                "name": "RANK",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/"
                        "job-completion-index']"
                    }
                },
            },
        ]
    }
    pod = {"metadata": {"annotations": {"batch.kubernetes.io/job-completion-index": "3"}}}
    env = resolve_env(container, pod)
    assert env == {"LATER_REF": "$(B)", "A": "a", "B": "a-b", "RANK": "3"}


def test_rewrite_applies_to_literals_before_expansion() -> None:
    container = {
        "command": ["run", "--config", "/etc/x.json"],
        "args": ["--dir=$(D)"],
        "env": [{"name": "D", "value": "/data/g1"}],
    }
    calls: list[str] = []

    def rewrite(value: str) -> str:
        calls.append(value)
        return value.replace("/", "/host/", 1) if value.startswith("/") else value

    env = resolve_env(container, {"metadata": {}}, rewrite)
    assert env["D"] == "/host/data/g1"
    argv = command_line(container, env, rewrite)
    assert argv == ["run", "--config", "/host/etc/x.json", "--dir=/host/data/g1"]
    assert "/host/data/g1" not in calls  # an expanded value is never rewritten twice


def test_secret_and_configmap_keys_come_from_the_manifests() -> None:
    given = {("Secret", "hub", "HF_TOKEN"): "hf_abc", ("ConfigMap", "cfg", "mode"): "fast"}

    def lookup(kind: str, name: str, key: str) -> str | None:
        return given.get((kind, name, key))

    env = [
        {"name": "T", "valueFrom": {"secretKeyRef": {"name": "hub", "key": "HF_TOKEN"}}},
        {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
        {"name": "O", "valueFrom": {"secretKeyRef": {"name": "x", "key": "k", "optional": True}}},
        {"name": "U", "value": "$(T)-$(M)"},
    ]
    resolved = resolve_env({"env": env}, {}, lookup=lookup)
    assert resolved == {"T": "hf_abc", "M": "fast", "U": "hf_abc-fast"}  # O absent: optional
    missing = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "KEY"}}}]
    with pytest.raises(ValueError, match="env K: Secret 's3' with key 'KEY' is not among"):
        resolve_env({"env": missing}, {}, lookup=lookup)


def test_unsupported_env_sources_and_field_paths_are_named() -> None:
    with pytest.raises(ValueError, match="resourceFieldRef"):
        resolve_env({"env": [{"name": "T", "valueFrom": {"resourceFieldRef": {}}}]}, {})
    with pytest.raises(ValueError, match=r"status\.podIPs"):
        field_value("status.podIPs", {})
    assert field_value("metadata.labels['app']", {"metadata": {"labels": {"app": "x"}}}) == "x"
    with pytest.raises(ValueError, match="no command"):
        command_line({"name": "c"}, {})
