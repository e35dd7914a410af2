"""Pod templates from the operator's own builders, translated into local processes."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmops.api.common import PretrainedModel
from llmops.api.dataset import Dataset
from llmops.api.trainingrun import TrainingRun
from llmops.builders import dataset as build_dataset
from llmops.builders import pretrained
from llmops.builders import trainingrun as build_training
from llmops.local import network, state
from llmops.local.context import Context
from llmops.local.job import JobResult, run_job
from llmops.local.network import LOOPBACK
from llmops.local.pod import Rewriter, container_ports, resolve_executable, translate
from llmops.local.process import Process
from llmops.local.volumes import Mount, MountTable, materialize, mount_table

ROOT = Path(__file__).resolve().parents[2]


def quickstart(layout: state.Layout, kind: str) -> dict:
    docs = yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text())
    return state.adopt(layout, next(d for d in docs if d["kind"] == kind))


def test_mount_table_maps_longest_prefix_on_path_boundaries(tmp_path: Path) -> None:
    table = MountTable(
        (
            Mount("/data", tmp_path / "claim", "persistentVolumeClaim", "data"),
            Mount("/data/cache", tmp_path / "cache", "emptyDir", "cache"),
            Mount("/tmp", tmp_path / "tmp", "emptyDir", "tmp"),
        )
    )
    assert table.host_path("/data") == str(tmp_path / "claim")
    assert table.host_path("/data/g1/x.bin") == str(tmp_path / "claim" / "g1" / "x.bin")
    assert table.host_path("/data/cache/a") == str(tmp_path / "cache" / "a")
    assert table.host_path("/database") is None
    assert table.host_path("/tmpfoo") is None
    assert table.host_path("relative/data") is None


def test_rewriter_maps_paths_peer_names_and_ports(tmp_path: Path) -> None:
    table = MountTable((Mount("/etc/llmops", tmp_path / "cfg", "configMap", "config"),))
    peers = frozenset(network.pod_names("run-workers-0", "run-headless", "ns", 2))
    rewrite = Rewriter(table, peers, {29500: 41234})
    assert rewrite("--config=/etc/llmops/t.json") == f"--config={tmp_path}/cfg/t.json"
    assert rewrite("run-workers-0-1.run-headless.ns.svc") == LOOPBACK
    assert rewrite("run-workers-0-0.run-headless.ns.svc.cluster.local:29500") == (
        f"{LOOPBACK}:41234"
    )
    assert rewrite("29500") == "41234"
    assert rewrite("--master-port=29500") == "--master-port=41234"
    assert rewrite("unrelated.example.com") == "unrelated.example.com"
    assert rewrite("1") == "1"


def test_training_gang_pod_runs_torchrun_locally(tmp_path: Path) -> None:
    layout = state.Layout(tmp_path / "state")
    body = quickstart(layout, "TrainingRun")
    run = TrainingRun.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    )
    job = build_training.worker_job(body, run, 0, "pvc://python-stdlib-data/g1")
    template = job["spec"]["template"]
    spec = template["spec"]
    pod_name = "stdlib-gpt-workers-0-0"
    table = mount_table(spec, spec["containers"][0], layout, "default", pod_name)
    ports = network.allocate(container_ports(spec))
    hosts = frozenset(
        network.pod_names("stdlib-gpt-workers-0", "stdlib-gpt-headless", "default", 1)
    )
    pod = translate(
        template,
        name=pod_name,
        namespace="default",
        mounts=table,
        termination_file=tmp_path / "term",
        hosts=hosts,
        ports=ports,
        index=0,
        cwd=tmp_path,
    )
    assert Path(pod.argv[0]).name == "torchrun"
    assert Path(pod.argv[0]).parent == Path(sys.executable).parent
    assert f"--master-addr={LOOPBACK}" in pod.argv
    assert f"--master-port={ports[build_training.RENDEZVOUS_PORT]}" in pod.argv
    assert "--node-rank=0" in pod.argv
    config = pod.argv[pod.argv.index("--config") + 1]
    assert config == str(layout.pod_dir("default", pod_name) / "configmaps/config/trainingrun.json")
    assert pod.env["LLMOPS_DATA_DIR"] == str(layout.volume("default", "python-stdlib-data") / "g1")
    assert pod.env["LLMOPS_CHECKPOINT_DIR"] == str(
        layout.volume("default", "stdlib-gpt-checkpoints")
    )
    assert pod.env["HOME"] == str(layout.pod_dir("default", pod_name) / "volumes/tmp")
    assert pod.env["NODE_RANK"] == pod.env["RANK"] == pod.env["JOB_COMPLETION_INDEX"] == "0"
    assert pod.env["MASTER_ADDR"] == LOOPBACK
    assert pod.env["DS_ACCELERATOR"] == "cpu"
    assert pod.grace_seconds == build_training.TERMINATION_GRACE_SECONDS


def test_dataset_slice_pods_get_their_index_and_config_files(tmp_path: Path) -> None:
    layout = state.Layout(tmp_path / "state")
    body = quickstart(layout, "Dataset")
    body["spec"]["parallelism"] = 3
    dataset = Dataset.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    )
    job = build_dataset.slices_job(body, dataset, 1)
    config = build_dataset.config_map(body)
    template = job["spec"]["template"]
    spec = template["spec"]
    table = mount_table(spec, spec["containers"][0], layout, "default", "s-2")
    materialize(table, spec, {config["metadata"]["name"]: config})
    pod = translate(
        template,
        name="s-2",
        namespace="default",
        mounts=table,
        termination_file=tmp_path / "t",
        index=2,
    )
    assert pod.argv[0] == sys.executable
    assert pod.argv[1:3] == ["-m", "llmops_trainer.data"]
    written = Path(pod.argv[pod.argv.index("--config") + 1])
    assert written.read_text() == config["data"]["dataset.json"]
    assert pod.env["JOB_COMPLETION_INDEX"] == "2"
    assert pod.env["LLMOPS_OUTPUT_DIR"] == str(
        layout.volume("default", "python-stdlib-data") / "g1"
    )
    assert pod.env["LLMOPS_NUM_SLICES"] == "3"


def test_secret_volumes_are_files_only_this_user_reads(tmp_path: Path) -> None:
    spec = {
        "volumes": [
            {
                "name": "auth",
                "secret": {"secretName": "s", "items": [{"key": "t", "path": "token"}]},
            }
        ],
        "containers": [{"name": "c", "volumeMounts": [{"name": "auth", "mountPath": "/a"}]}],
    }
    table = mount_table(spec, spec["containers"][0], state.Layout(tmp_path), "default", "p")
    materialize(table, spec, {}, {"s": {"t": "s3cret", "other": "x"}})
    token = Path(table.host_path("/a/token") or "")
    assert token.read_text() == "s3cret" and not token.with_name("other").exists()
    assert token.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="volume 'auth': Secret 's' is not among the manifests"):
        materialize(table, spec, {}, {})
    unsupported = {**spec, "volumes": [{"name": "auth", "csi": {"driver": "x"}}]}
    with pytest.raises(ValueError, match="'auth': csi volumes"):
        mount_table(unsupported, spec["containers"][0], state.Layout(tmp_path), "default", "p")


def test_executables_come_from_this_interpreter() -> None:
    assert resolve_executable("python") == sys.executable
    assert resolve_executable("/bin/sh") == "/bin/sh"
    assert resolve_executable("no-such-program-xyz") == "no-such-program-xyz"


# -- init containers ---------------------------------------------------------------------------


class _NoView:
    def update(self, key: object, **fields: object) -> None: ...
    def message(self, text: str) -> None: ...
    def failure(self, key: object, log_file: str, tail: str) -> None: ...


def _context(tmp_path: Path) -> Context:
    return Context(layout=state.Layout(tmp_path / "state"), view=_NoView(), cwd=tmp_path)


def test_init_containers_translate_like_the_container(tmp_path: Path) -> None:
    """The model initializer of a gang pod, from the operator's builders: the same path,
    env and index rewriting as the trainer, and a termination file of its own."""
    ctx = _context(tmp_path)
    layout = ctx.layout
    body = quickstart(layout, "TrainingRun")
    run = TrainingRun.model_validate(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    )
    job = build_training.worker_job(body, run, 0, "pvc://python-stdlib-data/g1")
    ctx.record_children(body, [build_training.config_map(body)])
    spec = job["spec"]["template"]["spec"]
    trainer = spec["containers"][0]
    checkpoints = [m for m in trainer["volumeMounts"] if m["mountPath"] == "/checkpoints"]
    model = pretrained.model_input(
        PretrainedModel(uri="s3://models/tiny", endpoint="http://minio:9000"),
        target="/checkpoints/pretrained",
        shared=True,
        resources=run.spec.resources,
        extra_mounts=checkpoints,
    )
    spec["initContainers"] = [model.init_container]
    trainer["env"] += model.env
    pod_name = "stdlib-gpt-workers-0-1"
    pod = ctx.prepare_pod(body, job["spec"]["template"], pod_name, index=1)

    (init,) = pod.init_containers
    assert init.container == "model-init" and pod.container == "trainer"
    assert init.argv == [sys.executable, "-m", "llmops_trainer.model_init"]
    fetched = str(layout.volume("default", "stdlib-gpt-checkpoints") / "pretrained")
    assert init.env["LLMOPS_PRETRAINED_DIR"] == pod.env["LLMOPS_PRETRAINED_DIR"] == fetched
    assert init.env["LLMOPS_PRETRAINED_URI"] == "s3://models/tiny"
    assert init.env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert init.env["LLMOPS_PRETRAINED_SHARED"] == "1"
    assert init.env["JOB_COMPLETION_INDEX"] == pod.env["JOB_COMPLETION_INDEX"] == "1"
    pod_dir = layout.pod_dir("default", pod_name)
    assert init.env["HOME"] == pod.env["HOME"] == str(pod_dir / "volumes/tmp")
    assert init.termination_file == pod_dir / "init/model-init/dev/termination-log"
    assert pod.termination_file == pod_dir / "dev/termination-log"
    assert init.grace_seconds == pod.grace_seconds
    assert not init.init_containers


def test_translate_needs_the_mounts_of_each_init_container(tmp_path: Path) -> None:
    template = _template([_python("init", "pass")], _python("main", "pass"))
    table = MountTable(())
    with pytest.raises(ValueError, match="1 init container"):
        translate(template, name="p", namespace="default", mounts=table, termination_file=tmp_path)


def _python(name: str, code: str) -> dict[str, Any]:
    return {
        "name": name,
        "command": ["python", "-c", code],
        "env": [{"name": "SHARED", "value": "/shared"}],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
    }


def _template(init: list[dict[str, Any]], main: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"labels": {}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "initContainers": init,
            "containers": [main],
            "volumes": [{"name": "shared", "emptyDir": {}}],
        },
    }


WRITE_MESSAGE = (
    "import os, pathlib, sys; "
    "pathlib.Path(os.environ['LLMOPS_TERMINATION_LOG']).write_text(sys.argv[1]); "
    "open(os.environ['SHARED'] + '/order', 'a').write(sys.argv[2] + '\\n'); "
    "print(sys.argv[2]); sys.exit(int(sys.argv[3]))"
)


def _step(name: str, message: str, code: int) -> dict[str, Any]:
    container = _python(name, WRITE_MESSAGE)
    container["args"] = [message, name, str(code)]
    return container


BODY = {"kind": "TrainingRun", "metadata": {"namespace": "default", "name": "r"}}


def _run(ctx: Context, template: dict[str, Any]) -> JobResult:
    job = {"spec": {"template": template, "completions": 1, "backoffLimit": 0}}

    def start(index: int | None) -> Process:
        return ctx.start(BODY, ctx.prepare_pod(BODY, template, "r-0", index=index))

    return run_job(job, start, threading.Event())


def test_init_containers_run_in_order_before_the_container(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    template = _template(
        [_step("first", "one", 0), _step("second", "two", 0)], _step("main", "done", 0)
    )
    result = _run(ctx, template)
    assert result.succeeded
    shared = ctx.layout.pod_dir("default", "r-0") / "volumes/shared"
    assert (shared / "order").read_text().split() == ["first", "second", "main"]
    (pod,) = result.pod_objects()
    assert pod["status"]["phase"] == "Succeeded"
    inits = pod["status"]["initContainerStatuses"]
    assert [s["name"] for s in inits] == ["first", "second"]
    assert [s["state"]["terminated"]["message"] for s in inits] == ["one", "two"]
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] == "done"
    log = ctx.log_file(BODY, "r-0")
    lines = log.read_text().splitlines()
    assert [line for line in lines if not line.startswith("==>")] == ["first", "second", "main"]
    assert "[init container first]" in lines[0]


def test_a_failed_init_container_fails_the_pod_before_it_starts(tmp_path: Path) -> None:
    ctx = _context(tmp_path)
    report = '{"stage":"model-init","reason":"ModelNotFound","message":"nothing at s3://m"}'
    template = _template(
        [_step("model-init", report, 1), _step("never", "x", 0)], _step("main", "done", 0)
    )
    result = _run(ctx, template)
    assert not result.succeeded and result.failed_pod is not None
    shared = ctx.layout.pod_dir("default", "r-0") / "volumes/shared"
    assert (shared / "order").read_text().split() == ["model-init"]
    assert result.failure is not None and "ModelNotFound" in result.failure
    pod = result.failed_pod.as_pod()
    assert pod["status"]["phase"] == "Failed"
    (init,) = pod["status"]["initContainerStatuses"]
    assert init["name"] == "model-init"
    assert init["state"]["terminated"] == {"exitCode": 1, "reason": "Error", "message": report}
    assert pod["status"]["containerStatuses"][0]["state"] == {
        "waiting": {"reason": "PodInitializing"}
    }


def test_a_pod_stopped_during_its_init_containers_never_starts_its_container(
    tmp_path: Path,
) -> None:
    ctx = _context(tmp_path)
    # Exits 0 on SIGTERM: a graceful init container must still not lead to the next one.
    graceful = _python(
        "wait",
        "import os, signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
        "open(os.environ['SHARED'] + '/order', 'a').write('wait\\n'); time.sleep(60)",
    )
    template = _template([graceful], _step("main", "done", 0))
    process = ctx.start(BODY, ctx.prepare_pod(BODY, template, "r-0"))
    order = ctx.layout.pod_dir("default", "r-0") / "volumes/shared/order"
    deadline = time.monotonic() + 10
    while not order.exists() and time.monotonic() < deadline:
        assert process.poll() is None
        time.sleep(0.05)
    assert process.terminate() == 0
    assert process.poll() == 0
    assert order.read_text().split() == ["wait"]
    assert [e.container for e in process.init_ended] == ["wait"]
