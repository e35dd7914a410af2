"""Build the test control plane from upstream Go modules, cached by version.

Each folder under components/ is a Go module pinning one tool:
kube (kube-apiserver, kube-controller-manager, kube-scheduler from k8s.io/kubernetes),
etcd (an embedded etcd server), kwok (simulated nodes), helm, promtool (checks and
unit-tests the chart's alerting rules) and kueue (Kueue's controller manager, with its CRDs
and webhook configurations from the same module).
Binaries go to $LLMOPS_CACHE/cluster-bin/<component>-<key>/ where the key hashes the module's
go.mod, go.sum, Go sources and the Go version, so a rebuild happens only when a pin changes.

Run as a script to build what is missing (with progress); import `component_bin_dirs()`
to find the binaries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMPONENTS_DIR = Path(__file__).resolve().parent / "components"
MINIMUM_GO = (1, 26)

# component -> files it provides
BINARIES = {
    "etcd": ["etcd"],
    "kube": ["kube-apiserver", "kube-controller-manager", "kube-scheduler"],
    "kwok": ["kwok", "kwok-stages.yaml"],
    "helm": ["helm"],
    "promtool": ["promtool"],
    "kueue": ["kueue", "kueue-crds.yaml", "kueue-webhooks.yaml"],
}

# Go build tags per component. promtool: leave out the service-discovery plugins (cloud SDKs)
# that rule checks never use, which cuts the build to a fraction.
BUILD_TAGS = {"promtool": ["remove_all_sd"]}
# Tools only some tests use: the control plane starts without them, and those tests fail
# with the build command when they are missing.
TOOLS_ONLY = {"promtool", "kueue"}

# kwok's own stage definitions, taken from the pinned module: nodes become Ready and keep a
# lease; pods become Ready; pods owned by a Job complete; deleted pods go away.
KWOK_STAGE_FILES = [
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
]

# Kueue's manifests, taken from the pinned module as its kustomize build would install them
# (the CRDs, and the admission webhooks its manager serves).
KUEUE_CRD_DIR = "config/components/crd/bases"
KUEUE_WEBHOOK_FILE = "config/components/webhook/manifests.yaml"


# Bumped when the way a component is built changes (flags, extra files), to rebuild the cache.
RECIPE = "2"


def _module_version(module: Path, path: str) -> str:
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Version}}", path],
        cwd=module,
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _ldflags(component: str, module: Path) -> list[str]:
    """Version stamps the upstream Makefiles set: without them kube-apiserver reports
    v0.0.0-master and helm assumes Kubernetes 1.20, and charts' kubeVersion checks fail."""
    flags: list[str] = []
    if component == "kube":
        version = _module_version(module, "k8s.io/kubernetes")  # e.g. v1.36.3
        major, minor = version.removeprefix("v").split(".")[:2]
        for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
            flags += [
                f"-X {package}.gitVersion={version}",
                f"-X {package}.gitMajor={major}",
                f"-X {package}.gitMinor={minor}",
                f"-X {package}.gitTreeState=clean",
            ]
    elif component == "helm":
        version = _module_version(module, "helm.sh/helm/v3")
        # client-go v0.N.x belongs to Kubernetes 1.N, as helm's Makefile computes it.
        kube_minor = _module_version(module, "k8s.io/client-go").split(".")[1]
        flags.append(f"-X helm.sh/helm/v3/internal/version.version={version}")
        for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
            flags += [
                f"-X {package}.k8sVersionMajor=1",
                f"-X {package}.k8sVersionMinor={kube_minor}",
            ]
    return ["-ldflags", " ".join(flags)] if flags else []


def _module_dir(module: Path, path: str) -> Path:
    out = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", path],
        cwd=module,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _join_yaml(files: list[Path]) -> str:
    return "\n---\n".join(path.read_text().strip() for path in files) + "\n"


def _write_kwok_stages(module: Path, staging: Path) -> None:
    source = _module_dir(module, "sigs.k8s.io/kwok")
    documents = [source / name for name in KWOK_STAGE_FILES]
    (staging / "kwok-stages.yaml").write_text(_join_yaml(documents))


def _write_kueue_manifests(module: Path, staging: Path) -> None:
    source = _module_dir(module, "sigs.k8s.io/kueue")
    crds = sorted((source / KUEUE_CRD_DIR).glob("*.yaml"))
    (staging / "kueue-crds.yaml").write_text(_join_yaml(crds))
    (staging / "kueue-webhooks.yaml").write_text(_join_yaml([source / KUEUE_WEBHOOK_FILE]))


def cache_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmops"
    return Path(os.environ.get("LLMOPS_CACHE", default)) / "cluster-bin"


def go_version() -> str:
    if shutil.which("go") is None:
        raise SystemExit(
            "error: the Go toolchain (1.26 or newer) is needed to build the test control plane; "
            "install it from your distribution or golang.org and put `go` on PATH"
        )
    out = subprocess.run(["go", "env", "GOVERSION"], check=True, capture_output=True, text=True)
    version = out.stdout.strip()  # e.g. go1.26.8
    parts = tuple(int(x) for x in version.removeprefix("go").split(".")[:2])
    if parts < MINIMUM_GO:
        raise SystemExit(f"error: Go {MINIMUM_GO[0]}.{MINIMUM_GO[1]}+ is needed, found {version}")
    return version


def component_key(component: str, go: str) -> str:
    module = COMPONENTS_DIR / component
    digest = hashlib.sha256(f"{go}/{RECIPE}".encode())
    if BUILD_TAGS.get(component):
        digest.update(",".join(BUILD_TAGS[component]).encode())
    for path in sorted(module.rglob("*")):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(str(path.relative_to(module)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def component_dir(component: str, go: str) -> Path:
    return cache_root() / f"{component}-{component_key(component, go)}"


def is_built(component: str, go: str) -> bool:
    target = component_dir(component, go)
    return all((target / name).is_file() for name in BINARIES[component])


def _build_targets(module: Path) -> list[str]:
    """Main packages of this module, or the module's `tool` entries (kwok, helm)."""
    if (module / "cmd").is_dir() or any(module.glob("*.go")):
        return ["./..."]
    tools = [
        line.split()[1]
        for line in (module / "go.mod").read_text().splitlines()
        if line.startswith("tool ")
    ]
    if not tools:
        raise SystemExit(f"error: {module}/go.mod has neither main packages nor tool lines")
    return tools


def build(component: str, go: str) -> Path:
    module = COMPONENTS_DIR / component
    target = component_dir(component, go)
    if is_built(component, go):
        print(f"[{component}] cached in {target}", flush=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{component}-tmp", dir=target.parent))
    command = [
        "go",
        "build",
        "-v",
        *(["-tags", ",".join(BUILD_TAGS[component])] if BUILD_TAGS.get(component) else []),
        *_ldflags(component, module),
        "-o",
        str(staging) + "/",
        *_build_targets(module),
    ]
    print(f"[{component}] building {', '.join(BINARIES[component])} ...", flush=True)
    started = time.monotonic()
    compiled = 0
    with subprocess.Popen(command, cwd=module, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        errors: list[str] = []
        for line in process.stderr:
            # `go build -v` names each package as it is compiled: that is our progress.
            compiled += 1
            errors.append(line)
            if compiled % 200 == 0:
                elapsed = time.monotonic() - started
                print(f"[{component}] {compiled} packages, {elapsed:.0f}s", flush=True)
    if process.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        sys.stderr.writelines(errors[-40:])
        raise SystemExit(f"error: building {component} failed")
    if component == "kwok":
        _write_kwok_stages(module, staging)
    elif component == "kueue":
        _write_kueue_manifests(module, staging)
    missing = [name for name in BINARIES[component] if not (staging / name).is_file()]
    if missing:
        shutil.rmtree(staging, ignore_errors=True)
        raise SystemExit(f"error: building {component} produced no {', '.join(missing)}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # publish atomically: a half-built folder is never used
    for stale in target.parent.glob(f"{component}-*"):
        if stale != target and not stale.name.startswith(f"{component}-tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # builds of older pins
    print(f"[{component}] built in {time.monotonic() - started:.0f}s -> {target}", flush=True)
    return target


def component_bin_dirs() -> dict[str, Path]:
    """Where each built binary lives; raises if something is not built yet."""
    go = go_version()
    found: dict[str, Path] = {}
    for component, names in BINARIES.items():
        if not is_built(component, go):
            if component in TOOLS_ONLY:
                continue
            raise RuntimeError(
                f"{component} is not built: run `python tests/cluster/build_components.py`"
            )
        for name in names:
            found[name] = component_dir(component, go) / name
    return found


def main() -> int:
    go = go_version()
    for component in BINARIES:
        build(component, go)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
