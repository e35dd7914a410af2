"""The images, checked with Docker's own Dockerfile parser (the `dockerfile` package wraps
BuildKit's Go parser): pinned multi-stage builds, non-root users, and exactly the commands the
builders put in pod specs (and the chart in the operator's Deployment)."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from llmops.api.dataset import Dataset
from llmops.api.modeldeployment import ModelDeployment
from llmops.api.trainingrun import TrainingRun
from llmops.builders import dataset as dataset_builder
from llmops.builders import modeldeployment as md_builder
from llmops.builders import trainingrun as tr_builder
from llmops.cli import build_parser

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"
EXACT_TAG = re.compile(r"^[\w./-]+:(\$\{\w+\}|\d+\.\d+\.\d+)[\w.-]*$")


def stages(path: Path) -> list[list[dockerfile.Command]]:
    commands = dockerfile.parse_file(str(path))
    result: list[list[dockerfile.Command]] = []
    for command in commands:
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def args_of(path: Path) -> dict[str, str]:
    found = {}
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, _, value = command.value[0].partition("=")
            found[name] = value
    return found


def final(path: Path, instruction: str) -> dockerfile.Command | None:
    return next((c for c in reversed(stages(path)[-1]) if c.cmd == instruction), None)


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stages(path)[-1]:
        if command.cmd == "ENV":
            values = list(command.value)
            env.update(zip(values[::2], values[1::2], strict=True))
    return env


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_multi_stage_pinned_non_root(path: Path):
    built = stages(path)
    assert len(built) >= 2, "multi-stage: the build tools stay out of the final image"
    pins = args_of(path)
    for stage in built:
        image = stage[0].value[0]
        assert EXACT_TAG.match(image), f"{image}: pin an exact version"
        for name, value in pins.items():
            image = image.replace(f"${{{name}}}", value)
        assert re.search(r":\d+\.\d+\.\d+", image) and "latest" not in image, image
    assert not any(c.cmd == "ADD" for stage in built for c in stage), "COPY, not ADD"
    user = final(path, "USER")
    assert user is not None
    uid = user.value[0].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user (runAsNonRoot checks it)"
    assert uid == "65532"  # llmops.builders.pods.RUN_AS_USER and the chart's runAsUser
    copies = [c for c in built[-1] if c.cmd == "COPY"]
    assert copies and all(any(f.startswith("--from=") for f in c.flags) for c in copies)


def test_the_trainer_image_is_cuda_based_with_deepspeed_ops_prebuilt():
    built = stages(TRAINER)
    assert all(stage[0].value[0].startswith("nvidia/cuda:") for stage in built)
    assert "runtime" in built[-1][0].value[0] and "devel" in built[0][0].value[0]
    build_env = " ".join(" ".join(c.value) for c in built[0] if c.cmd == "ENV")
    assert "DS_BUILD_FUSED_ADAM 1" in build_env or "DS_BUILD_FUSED_ADAM=1" in build_env
    run = " ".join(" ".join(c.value) for c in built[0] if c.cmd == "RUN")
    assert ".[trainer]" in run


def _manifests() -> list[dict[str, Any]]:
    def body(path: str) -> dict[str, Any]:
        doc = yaml.safe_load((ROOT / "examples" / path).read_text())
        doc["metadata"].update(namespace="ml", uid="u1", generation=1)
        return dict(doc)

    ds = body("dataset.yaml")
    tr = body("trainingrun.yaml")
    md = body("modeldeployment.yaml")
    dataset = Dataset.model_validate(ds)
    run = TrainingRun.model_validate(tr)
    model = ModelDeployment.model_validate(md)
    return [
        *(job for _, job in dataset_builder.stage_jobs(ds, dataset, 1)),
        tr_builder.worker_job(tr, run, 0, "pvc://corpus-data/g1", None),
        md_builder.deployment(md, model, 2, "pvc://models/gpt/final"),
    ]


def _module_is_runnable(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    if spec.submodule_search_locations:  # a package: needs __main__
        return importlib.util.find_spec(f"{module}.__main__") is not None
    return 'if __name__ == "__main__"' in Path(spec.origin).read_text()


def test_the_trainer_image_runs_the_commands_the_builders_put_in_pod_specs():
    path = env_of(TRAINER)["PATH"].split(":")
    assert path[0] == "/opt/venv/bin"
    run = " ".join(" ".join(c.value) for c in stages(TRAINER)[0] if c.cmd == "RUN")
    assert "python3 -m venv /opt/venv" in run  # the venv provides `python`
    assert "torch" in run  # torch installs the `torchrun` console script into the venv
    seen = set()
    for manifest in _manifests():
        (container,) = manifest["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        executable = command[0]
        assert executable in ("python", "torchrun"), command
        module = command[command.index("-m") + 1]
        assert _modules_in_image(module), f"{module} is not in the trainer image"
        assert _module_is_runnable(module), f"`{shlex.join(command)}`: {module} cannot be run"
        seen.add((executable, module))
    assert seen == {
        ("python", "llmops_trainer.data"),
        ("torchrun", "llmops_trainer.train"),
        ("python", "llmops_trainer.serve"),
    }


def _modules_in_image(module: str) -> bool:
    """The image installs the project (both packages) with the trainer extra."""
    copied = {c.value[0] for c in stages(TRAINER)[0] if c.cmd == "COPY" and len(c.value) == 2}
    return module.split(".")[0] == "llmops_trainer" and "trainer_image" in copied


def test_the_operator_image_runs_llmops_operator_as_the_chart_calls_it():
    entrypoint = final(OPERATOR, "ENTRYPOINT")
    assert entrypoint is not None and entrypoint.json and list(entrypoint.value) == ["llmops"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'llmops = "llmops.cli:main"' in pyproject  # the console script on the venv's PATH
    assert env_of(OPERATOR)["PATH"].startswith("/opt/venv/bin")
    run = " ".join(" ".join(c.value) for c in stages(OPERATOR)[0] if c.cmd == "RUN")
    assert "pip install ." in run and "[trainer]" not in run  # no torch in the operator
    cmd = final(OPERATOR, "CMD")
    assert cmd is not None
    args = build_parser().parse_args(list(cmd.value))
    assert args.command == "operator" and args.all_namespaces

    from build_components import component_bin_dirs

    try:
        helm = component_bin_dirs()["helm"]
    except (RuntimeError, SystemExit, KeyError):
        pytest.skip("helm is not built")
    rendered = subprocess.run(
        [str(helm), "template", "r", str(ROOT / "helm" / "llmops")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "command" not in container  # the image's ENTRYPOINT runs
    chart_args = build_parser().parse_args(container["args"])
    assert chart_args.command == "operator"
    assert chart_args.metrics_port == 8000
