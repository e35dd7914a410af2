"""The control-plane build cache is keyed by what is pinned, so it rebuilds exactly when a
pin changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import build_components


@pytest.fixture
def components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "components"
    shutil.copytree(build_components.COMPONENTS_DIR, copy, ignore=shutil.ignore_patterns("*.sum"))
    monkeypatch.setattr(build_components, "COMPONENTS_DIR", copy)
    monkeypatch.setenv("LLMOPS_CACHE", str(tmp_path / "cache"))
    return copy


def test_key_changes_with_the_pin_and_the_go_version(components: Path):
    before = build_components.component_key("kwok", "go1.26.8")
    assert build_components.component_key("kwok", "go1.26.8") == before
    assert build_components.component_key("kwok", "go1.27.0") != before
    go_mod = components / "kwok" / "go.mod"
    go_mod.write_text(
        go_mod.read_text().replace("sigs.k8s.io/kwok v0.8.0", "sigs.k8s.io/kwok v0.7.0")
    )
    assert build_components.component_key("kwok", "go1.26.8") != before


def test_every_component_pins_exact_versions():
    for component in build_components.BINARIES:
        go_mod = (build_components.COMPONENTS_DIR / component / "go.mod").read_text()
        assert (build_components.COMPONENTS_DIR / component / "go.sum").is_file()
        assert "latest" not in go_mod and "=> ./" not in go_mod


def test_kubernetes_staging_modules_are_all_replaced_by_published_versions():
    go_mod = (build_components.COMPONENTS_DIR / "kube" / "go.mod").read_text()
    replaced = [line.split() for line in go_mod.splitlines() if "=> k8s.io/" in line]
    assert len(replaced) >= 30
    assert {parts[-1] for parts in replaced} == {"v0.36.3"}
    assert "k8s.io/kubernetes v1.36.3" in go_mod


def test_build_targets_are_main_packages_or_tools(components: Path):
    assert build_components._build_targets(components / "kube") == ["./..."]
    assert build_components._build_targets(components / "kwok") == ["sigs.k8s.io/kwok/cmd/kwok"]
    assert build_components._build_targets(components / "helm") == ["helm.sh/helm/v3/cmd/helm"]
    assert build_components._build_targets(components / "kueue") == ["sigs.k8s.io/kueue/cmd/kueue"]


def test_kueue_shares_the_kubernetes_modules_of_the_control_plane():
    """Kueue's k8s.io modules are raised to the control plane's pins, so both builds share
    the Go module and build caches (and Kueue is built against the API it talks to)."""

    def pins(component: str) -> dict[str, str]:
        go_mod = (build_components.COMPONENTS_DIR / component / "go.mod").read_text()
        found: dict[str, str] = {}
        for line in go_mod.splitlines():
            parts = line.split("//")[0].replace("=>", " ").split()
            if parts and parts[0].startswith("k8s.io/") and parts[-1].startswith("v0.36"):
                found[parts[0]] = parts[-1]
        return found

    kube, kueue = pins("kube"), pins("kueue")
    assert {"k8s.io/api", "k8s.io/client-go", "k8s.io/apimachinery"} <= kueue.keys()
    assert {name: kueue[name] for name in kueue.keys() & kube.keys()} == {
        name: kube[name] for name in kueue.keys() & kube.keys()
    }
    go_mod = (build_components.COMPONENTS_DIR / "kueue" / "go.mod").read_text()
    assert "k8s.io/kubernetes v1.36.3" in go_mod


def test_unbuilt_component_is_reported_not_guessed(components: Path):
    assert not build_components.is_built("helm", "go1.26.8")
