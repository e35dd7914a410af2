"""Pod templates from the operator's own builders, translated into local processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llmops.api.dataset import Dataset
from llmops.api.trainingrun import TrainingRun
from llmops.builders import dataset as build_dataset
from llmops.builders import trainingrun as build_training
from llmops.local import network, state
from llmops.local.network import LOOPBACK
from llmops.local.pod import Rewriter, container_ports, resolve_executable, translate
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


def test_secret_volumes_are_refused_with_the_volume_name(tmp_path: Path) -> None:
    spec = {
        "volumes": [{"name": "auth", "secret": {"secretName": "s"}}],
        "containers": [{"name": "c", "volumeMounts": [{"name": "auth", "mountPath": "/a"}]}],
    }
    with pytest.raises(ValueError, match="'auth': secret volumes"):
        mount_table(spec, spec["containers"][0], state.Layout(tmp_path), "default", "p")


def test_executables_come_from_this_interpreter() -> None:
    assert resolve_executable("python") == sys.executable
    assert resolve_executable("/bin/sh") == "/bin/sh"
    assert resolve_executable("no-such-program-xyz") == "no-such-program-xyz"
