"""Operator scale on the real control plane (tests/cluster/controlplane.py).

Creates 50, 100 and 200 TrainingRuns at once (each round in its own namespace), then 50
ModelDeployments and 50 Sweeps (`--sweeps`; timed until each counts its first trials, then
until every trial has its children), and prints, per round, p50/p99 of the time from
creating a resource until all its children exist and it reports `Created` (TrainingRun), a
phase (ModelDeployment) or its first trials (Sweep);
the operator's peak RSS; and Kubernetes API requests per reconcile (counted inside the
operator process, in both of its HTTP clients: kopf's aiohttp and the kubernetes client's
urllib3). The operator runs as `llmops operator --all-namespaces` in a child process with the
default reconcile interval.

    python benchmarks/operator_scale.py [--counts 50,100,200] [--deployments 50] [--quiet 15]

After each round, a quiet period (`--quiet` seconds, nothing changes; every resource created so
far is reconciled by its timer) gives the steady-state API requests per reconcile, by client.
`--counts 50,200,1000` adds a 1,000-run round (goal: all done within 60 s).

With --failures N (default 200), after the round of N runs the operator is killed with SIGKILL
and restarted (time until it reconciled every run again; no child created twice, no status
lost), then the API server is restarted under it (new runs and suspensions made right after
must be acted on once the operator's watches re-list).

With --instant N (default 200), after the round of N runs the operator is stopped and N runs
more are created, whose children, status and events this process writes the moment each run
exists (the operator's own decisions, without its reads, watch delays or queue): the bound
the API server and the rest of the cluster set on this machine, printed beside the operator's.

Goals: 1,000 runs with children and `Created` within 5 s of creation at p99 (floor: 200 runs
at p99 < 2 s, 1,000 all done within 60 s), operator RSS under 250 MB, no API request per
reconcile at steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

GROUP, VERSION = "llmops.dev", "v1alpha1"


def operator_child(port: int) -> int:
    """Runs in the operator process: count API requests, then run the operator."""
    import aiohttp
    import urllib3
    from prometheus_client import Counter

    from llmops.cli import main

    requests = Counter("bench_api_requests", "Kubernetes API requests", ["client"])
    by_kind = Counter("bench_api_calls", "llmops client requests", ["method", "resource"])
    original_urlopen = urllib3.connectionpool.HTTPConnectionPool.urlopen

    def urlopen(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        requests.labels("kubernetes").inc()
        by_kind.labels(*call_labels(method, url)).inc()
        return original_urlopen(self, method, url, *args, **kwargs)

    urllib3.connectionpool.HTTPConnectionPool.urlopen = urlopen  # type: ignore[method-assign]
    original_request = aiohttp.ClientSession._request

    async def request(self: Any, method: str, url: Any, *args: Any, **kwargs: Any) -> Any:
        requests.labels("kopf").inc()
        by_kind.labels(*call_labels(f"kopf {method}", str(url))).inc()
        return await original_request(self, method, url, *args, **kwargs)

    aiohttp.ClientSession._request = request  # type: ignore[method-assign]
    return main(["operator", "--all-namespaces", f"--metrics-port={port}", "--health-port=0"])


def call_labels(method: str, url: str) -> tuple[str, str]:
    """(method, plus `watch` for a watch; the resource, with its subresource) of a request."""
    parts = url.split("?")[0].split("/")
    where = parts.index("namespaces") + 2 if "namespaces" in parts else len(parts) - 1
    resource = "/".join(parts[where : where + 1] + parts[where + 2 : where + 3])
    return method + ("watch" if "watch=" in url else ""), resource


def scrape(port: int) -> dict[str, float]:
    """Metric totals by name, and the request counter also by client (`name{client}`)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name = line.split("{")[0].split(" ")[0]
        value = float(line.rsplit(" ", 1)[1])
        totals[name] = totals.get(name, 0.0) + value
        if name in ("bench_api_requests_total", "bench_api_calls_total") and "{" in line:
            totals[line.rsplit(" ", 1)[0]] = value
    return totals


def calls_between(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The llmops client's requests by method and resource, and kopf's, between scrapes."""
    calls = {
        k.split("{", 1)[1].rstrip("}"): int(after[k] - before.get(k, 0.0))
        for k in after
        if k.startswith("bench_api_calls_total{") and after[k] - before.get(k, 0.0)
    }
    kopf = 'bench_api_requests_total{client="kopf"}'
    calls["kopf"] = int(after.get(kopf, 0.0) - before.get(kopf, 0.0))
    return calls


def steady_state(
    port: int, seconds: float, what: str, cpu: CpuMeter, api: Any | None = None
) -> None:
    """API requests per reconcile while nothing changes (every timer still ticks)."""
    if seconds <= 0:
        return
    before = scrape(port)
    cpu.start()
    time.sleep(seconds)
    after = scrape(port)
    print(f"steady state {what}: {cpu.line()}", flush=True)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    reconciles = delta("llmops_operator_reconcile_duration_seconds_count")
    requests = delta("bench_api_requests_total")
    kopf_requests = delta('bench_api_requests_total{client="kopf"}')
    client_requests = delta('bench_api_requests_total{client="kubernetes"}')
    calls = calls_between(before, after)
    per = requests / reconciles if reconciles else float("nan")
    print(
        f"steady state {what}: {seconds:.0f}s, {reconciles:.0f} reconciles, "
        f"{requests:.0f} API requests ({client_requests:.0f} llmops client, {kopf_requests:.0f} "
        f"kopf) = {per:.2f} per reconcile; llmops client calls: {calls}",
        flush=True,
    )
    if api is not None:
        phases = [
            (run.get("status") or {}).get("phase")
            for run in _items(api, f"/apis/{GROUP}/{VERSION}/trainingruns")
        ]
        running = phases.count("Running")
        writes = calls.get('method="PATCH",resource="trainingruns/status"', 0)
        rate = writes / running / (seconds / 60) if running else float("nan")
        print(
            f"steady state {what}: runs by phase {dict(Counter(phases))}; {writes} status "
            f"writes = {rate:.2f} per running run per minute",
            flush=True,
        )


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds each process has used so far (/proc/<pid>/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return used


class CpuMeter:
    """Where the CPU went between start() and line(): each process's seconds and its share of
    the machine (all cores) over the wall time, biggest first."""

    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        self.pids = pids
        self.started, self.before = 0.0, {}

    def start(self) -> None:
        self.started, self.before = time.monotonic(), cpu_seconds(self.pids())

    def line(self) -> str:
        wall = time.monotonic() - self.started
        after = cpu_seconds(self.pids())
        used = {k: v - self.before.get(k, 0.0) for k, v in after.items()}
        capacity = wall * (os.cpu_count() or 1)
        parts = [
            f"{name} {seconds:.1f}s ({seconds / capacity:.0%})"
            for name, seconds in sorted(used.items(), key=lambda kv: -kv[1])
            if seconds >= 0.05
        ]
        total = sum(used.values())
        return f"CPU over {wall:.1f}s: " + ", ".join(parts) + f"; all {total / capacity:.0%}"


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="50,100,200")
    parser.add_argument("--deployments", type=int, default=50)
    parser.add_argument(
        "--sweeps",
        type=int,
        default=50,
        help=f"Sweeps of {SWEEP_TRIALS} trials, {SWEEP_PARALLEL} at a time, created at once",
    )
    parser.add_argument("--quiet", type=float, default=15.0, help="steady-state seconds")
    parser.add_argument(
        "--failures",
        type=int,
        default=200,
        help="after the round of this many runs: SIGKILL the operator, then restart the API "
        "server, and check that everything converges (0: skip)",
    )
    parser.add_argument(
        "--instant",
        type=int,
        default=200,
        help="after the round of this many runs, with the operator stopped: as many runs whose "
        "children and status this process writes the moment each run exists, the operator's "
        "decisions without its reads and queue (0: skip)",
    )
    parser.add_argument("--operator-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.operator_child:
        return operator_child(args.operator_child)

    import yaml
    from kubernetes import client, config
    from kubernetes.dynamic import DynamicClient

    from controlplane import ControlPlane, free_port, wait_for

    with (
        tempfile.TemporaryDirectory(prefix="llmops-scale-") as tmp,
        ControlPlane.start(Path(tmp)) as plane,
    ):
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        dynamic = DynamicClient(api)
        crds = dynamic.resources.get(
            api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition"
        )
        for file in sorted((ROOT / "crds").glob("*.yaml")):
            for doc in yaml.safe_load_all(file.read_text()):
                crds.server_side_apply(body=doc, name=doc["metadata"]["name"], field_manager="b")
        extensions = client.ApiextensionsV1Api(api)
        wait_for(
            "CRDs",
            lambda: all(
                any(c.type == "Established" for c in (crd.status.conditions or []))
                for crd in extensions.list_custom_resource_definition().items
            ),
            60,
        )
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}

        def start_operator() -> tuple[subprocess.Popen[bytes], int]:
            port = free_port()
            process = subprocess.Popen(
                [sys.executable, __file__, "--operator-child", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_for("operator metrics", lambda: bool(scrape(port)), 60)
            return process, port

        operator, port = start_operator()
        cpu = CpuMeter(
            lambda: {
                "operator": operator.pid,
                **{p.name: p.popen.pid for p in plane.processes},
                "benchmark": os.getpid(),
            }
        )
        try:
            print(f"machine: {os.cpu_count()} CPUs; operator pid {operator.pid}", flush=True)
            counts = [int(c) for c in args.counts.split(",")]
            for count in counts:
                namespace = f"scale-tr-{count}"
                setup_namespace(core, custom, namespace)
                cpu.start()
                result = run_round(
                    custom, api, port, namespace, "trainingruns", count, training_run
                )
                report(f"{count} TrainingRuns", result, operator.pid)
                print(f"{count} TrainingRuns: {cpu.line()}", flush=True)
                steady_state(port, args.quiet, f"after {count} TrainingRuns", cpu, api)
                if count == args.instant:
                    # The same count again with the operator stopped, in the same cluster.
                    operator.terminate()
                    operator.wait(60)
                    instant_round(core, custom, api, count, cpu)
                    operator, port = start_operator()
                if count == args.failures:
                    operator, port = operator_killed(
                        api, custom, namespace, count, operator, start_operator
                    )
                    apiserver_restarted(plane, api, custom, namespace, count)
            if args.deployments:
                namespace = f"scale-md-{args.deployments}"
                setup_namespace(core, custom, namespace)
                cpu.start()
                result = run_round(
                    custom,
                    api,
                    port,
                    namespace,
                    "modeldeployments",
                    args.deployments,
                    model_deployment,
                )
                report(f"{args.deployments} ModelDeployments", result, operator.pid)
                print(f"{args.deployments} ModelDeployments: {cpu.line()}", flush=True)
                what = f"after {args.deployments} ModelDeployments"
                steady_state(port, args.quiet, what, cpu)
            if args.sweeps:
                namespace = f"scale-sw-{args.sweeps}"
                setup_namespace(core, custom, namespace)
                cpu.start()
                result = run_round(custom, api, port, namespace, "sweeps", args.sweeps, sweep)
                what = f"{args.sweeps} Sweeps ({args.sweeps * SWEEP_PARALLEL} trials running)"
                report(what, result, operator.pid)
                print(f"{what}: {cpu.line()}", flush=True)
                trials_created(api, namespace, args.sweeps * SWEEP_PARALLEL, cpu)
                steady_state(port, args.quiet, f"after {args.sweeps} Sweeps", cpu)
        finally:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:  # still finishing a backlog of handlers
                operator.kill()
                operator.wait(30)
    return 0


def instant_round(core: Any, custom: Any, api: Any, count: int, cpu: CpuMeter) -> None:
    namespace = f"scale-instant-{count}"
    setup_namespace(core, custom, namespace)
    cpu.start()
    writes = InstantOperator(api, namespace)
    result = run_round(custom, api, 0, namespace, "trainingruns", count, training_run, writes)
    writes.pool.shutdown()
    what = f"{count} TrainingRuns, instant operator (the bound)"
    report(what, result, None)
    print(f"{what}: {cpu.line()}", flush=True)


def snapshot(api: Any, namespace: str) -> tuple[dict[str, Any], list[str]]:
    """Each run's phase, Created condition and restart count, and every Job's name."""
    runs = {
        item["metadata"]["name"]: (
            (item.get("status") or {}).get("phase"),
            any(
                c["type"] == "Created" and c["status"] == "True"
                for c in (item.get("status") or {}).get("conditions", [])
            ),
            (item.get("status") or {}).get("restarts"),
        )
        for item in _items(api, f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/trainingruns")
    }
    jobs = sorted(_names(api, f"/apis/batch/v1/namespaces/{namespace}/jobs"))
    return runs, jobs


def operator_killed(
    api: Any,
    custom: Any,
    namespace: str,
    count: int,
    operator: subprocess.Popen[bytes],
    start_operator: Callable[[], tuple[subprocess.Popen[bytes], int]],
) -> tuple[subprocess.Popen[bytes], int]:
    """SIGKILL the operator with `count` runs live and start a new one: the time until it
    reconciled every run again, and whether a child was duplicated or a status lost."""
    runs_before, jobs_before = snapshot(api, namespace)
    operator.kill()
    operator.wait(30)
    killed = time.monotonic()
    operator, port = start_operator()
    started = time.monotonic() - killed

    def reconciled() -> bool:
        return scrape(port).get("llmops_operator_reconcile_duration_seconds_count", 0) >= count

    from controlplane import wait_for

    wait_for("every run reconciled by the new operator", reconciled, 600)
    converged = time.monotonic() - killed
    time.sleep(10)  # two more timer ticks: anything it would duplicate exists by now
    runs_after, jobs_after = snapshot(api, namespace)
    lost = [name for name, was in runs_before.items() if runs_after.get(name) != was]
    extra = sorted(set(jobs_after) - set(jobs_before))
    print(
        f"operator SIGKILL with {count} runs: new operator up after {started:.1f}s, every run "
        f"reconciled after {converged:.1f}s; {len(jobs_after)} Jobs for {len(runs_after)} runs "
        f"(duplicates: {extra or 'none'}); runs whose phase, Created or restarts changed: "
        f"{lost or 'none'}",
        flush=True,
    )
    print(
        "json "
        + json.dumps(
            {
                "what": f"operator SIGKILL at {count}",
                "up_s": started,
                "converged_s": converged,
                "duplicates": extra,
                "changed": lost,
            }
        ),
        flush=True,
    )
    return operator, port


def apiserver_restarted(plane: Any, api: Any, custom: Any, namespace: str, count: int) -> None:
    """Restart the API server under the operator (every watch breaks), then create new runs
    and suspend existing ones: the operator must notice both once its watches re-list."""
    down = plane.restart_apiserver()
    changed = time.monotonic()
    new = [f"late{i:03d}" for i in range(20)]
    for name in new:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, "trainingruns", training_run(name)
        )
    suspended = [f"r{i:04d}" for i in range(0, min(count, 20))]
    for name in suspended:
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "trainingruns", name, {"spec": {"suspend": True}}
        )

    def caught_up() -> bool:
        runs, jobs = snapshot(api, namespace)
        created = all(runs.get(n, (None, False, None))[1] for n in new)
        jobs_now = {
            item["metadata"]["name"]: bool(item["spec"].get("suspend"))
            for item in _items(api, f"/apis/batch/v1/namespaces/{namespace}/jobs")
        }
        held = all(jobs_now.get(f"{n}-workers-0") for n in suspended)
        return created and held and all(f"{n}-workers-0" in jobs for n in new)

    from controlplane import wait_for

    wait_for("the operator catching up after the API server restart", caught_up, 600)
    print(
        f"API server restart with {count} runs: down {down:.1f}s; 20 new runs created and 20 "
        f"suspended afterwards were all acted on {time.monotonic() - changed:.1f}s later",
        flush=True,
    )
    print(
        "json "
        + json.dumps(
            {
                "what": f"apiserver restart at {count}",
                "down_s": down,
                "caught_up_s": time.monotonic() - changed,
            }
        ),
        flush=True,
    )


def setup_namespace(core: Any, custom: Any, namespace: str) -> None:
    """A namespace with a finished Dataset and the claims the resources reference."""
    core.create_namespace({"metadata": {"name": namespace}})
    for claim in ("corpus-data", "models"):
        core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "datasets",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Dataset",
            "metadata": {"name": "corpus"},
            "spec": {
                "sources": [{"name": "local", "path": "data/corpus.txt"}],
                "tokenizer": {"train": {"vocabSize": 512}},
            },
        },
    )
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        "datasets",
        "corpus",
        {
            "status": {
                "phase": "Succeeded",
                "observedGeneration": 1,
                "outputUri": "pvc://corpus-data/g1",
                "conditions": [
                    {
                        "type": "Complete",
                        "status": "True",
                        "reason": "Processed",
                        "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            }
        },
    )


def training_run(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "datasetRef": {"name": "corpus"},
            "model": {"numLayers": 2, "numHeads": 2, "hiddenSize": 64, "contextLength": 64},
            "hyperparameters": {"maxSteps": 100, "microBatchSize": 4},
            "resources": {"numNodes": 2, "procsPerNode": 1, "gpusPerNode": 1},
        },
    }


SWEEP_TRIALS, SWEEP_PARALLEL = 20, 4


def sweep(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Sweep",
        "metadata": {"name": name},
        "spec": {
            "algorithm": "random",
            "objective": {"metric": "validationLoss", "direction": "minimize"},
            "maxTrials": SWEEP_TRIALS,
            "parallelTrials": SWEEP_PARALLEL,
            "parameters": [
                {
                    "name": "lr",
                    "path": "hyperparameters.learningRate",
                    "type": "log-uniform",
                    "min": 0.0001,
                    "max": 0.003,
                }
            ],
            "template": training_run(name)["spec"],
        },
    }


def trials_created(api: Any, namespace: str, count: int, cpu: CpuMeter) -> None:
    """After a Sweep round: how long until every trial running has its children and Created."""
    from controlplane import wait_for

    def created() -> int:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/trainingruns"
        return sum(reported("trainingruns", run) for run in _items(api, path))

    wait_for(f"{count} trials with their children", lambda: created() >= count, 600)
    missing = children_missing(api, namespace, "trainingruns", sorted(
        run["metadata"]["name"] for run in _items(
            api, f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/trainingruns")))  # fmt: skip
    print(
        f"every one of the {count} trials Created (children missing: {len(missing)}): {cpu.line()}",
        flush=True,
    )


def model_deployment(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "pvc://models/gpt/final"}, "replicas": 1},
    }


def _items(api: Any, path: str) -> list[dict[str, Any]]:
    """A list as plain JSON: the client's models cost the (shared) CPUs more than the
    operator under test at 1,000 objects a kind, polled every 0.2 s."""
    request = api.param_serialize(
        "GET", path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
    )
    items: list[dict[str, Any]] = json.loads(api.call_api(*request).read())["items"]
    return items


def _names(api: Any, path: str) -> set[str]:
    return {item["metadata"]["name"] for item in _items(api, path)}


def reported(plural: str, obj: dict[str, Any]) -> bool:
    """Whether the operator reported on the resource: `Created` (TrainingRun, written once its
    children exist) or a phase (ModelDeployment)."""
    status = obj.get("status") or {}
    if plural == "trainingruns":
        return any(
            c["type"] == "Created" and c["status"] == "True" for c in status.get("conditions", [])
        )
    if plural == "sweeps":  # its first trials exist
        trials = status.get("trials") or {}
        return sum(v for k, v in trials.items() if k != "finished") >= SWEEP_PARALLEL
    return bool(status.get("phase"))


def children_missing(api: Any, namespace: str, plural: str, names: list[str]) -> list[str]:
    """The resources (of `names`) some child of which does not exist, from one listing per
    child kind."""
    ns = f"/namespaces/{namespace}"
    if plural == "sweeps":  # its first trials (TrainingRuns labelled with the sweep) exist
        runs = _items(api, f"/apis/{GROUP}/{VERSION}{ns}/trainingruns")
        sweeps = [(run["metadata"].get("labels") or {}).get(f"{GROUP}/sweep") for run in runs]
        return [n for n in names if sweeps.count(n) < SWEEP_PARALLEL]
    configs = _names(api, f"/api/v1{ns}/configmaps")
    services = _names(api, f"/api/v1{ns}/services")
    if plural == "trainingruns":
        jobs = _names(api, f"/apis/batch/v1{ns}/jobs")
        return [
            n
            for n in names
            if f"{n}-config" not in configs
            or f"{n}-headless" not in services
            or f"{n}-workers-0" not in jobs
        ]
    deployments = _names(api, f"/apis/apps/v1{ns}/deployments")
    budgets = _names(api, f"/apis/policy/v1{ns}/poddisruptionbudgets")
    return [
        n
        for n in names
        if f"{n}-config" not in configs
        or f"{n}-server" not in deployments
        or n not in services
        or not any(b.startswith(n) for b in budgets)
    ]


def watch_reports(
    api: Any, namespace: str, plural: str, count: int, done_at: dict[str, float]
) -> threading.Thread:
    """A thread that watches the resources and records when each was first reported on, until
    `count` were. A watch rather than polling lists: lists of 1,000 objects several times a
    second cost the API server (the machine under test) more than the operator does."""
    from kubernetes import client, watch

    custom = client.CustomObjectsApi(api)
    started = threading.Event()

    def listed() -> str:
        """List (recording what is already reported); the version to watch from."""
        listing = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        for obj in listing["items"]:
            if obj["metadata"]["name"] not in done_at and reported(plural, obj):
                done_at[obj["metadata"]["name"]] = time.monotonic()
        return str(listing["metadata"]["resourceVersion"])

    def run() -> None:
        stream = watch.Watch()
        version = listed()
        started.set()
        while len(done_at) < count:
            try:
                for event in stream.stream(
                    custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    plural,
                    resource_version=version,
                    timeout_seconds=60,
                ):
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    name = obj["metadata"]["name"]
                    if name not in done_at and reported(plural, obj):
                        done_at[name] = time.monotonic()
                    if len(done_at) >= count:
                        stream.stop()
            except client.ApiException:  # 410 Gone and the like: list again
                version = listed()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(30)
    return thread


class InstantOperator:
    """A bound on what any operator could do here: for each run, the moment it exists, the
    operator's own decision (`llmops.decide.trainingrun.decide` on the run and its Dataset)
    handed to a pool of as many threads as the operator's handlers, which write it at once:
    the children as server-side applies, the status patch, the events. No read, no watch
    delay, no kopf: the time it takes is the API server's and the rest of the cluster's, and
    what the operator adds is the difference."""

    def __init__(self, api: Any, namespace: str) -> None:
        import copy

        from kubernetes import client

        from llmops.controllers.kube import HANDLER_THREADS

        configuration = copy.copy(api.configuration)
        configuration.connection_pool_maxsize = HANDLER_THREADS  # as the operator's client
        self.api, self.namespace = client.ApiClient(configuration), namespace
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/datasets"
        self.dataset = next(d for d in _items(api, path) if d["metadata"]["name"] == "corpus")
        self.pool = ThreadPoolExecutor(HANDLER_THREADS)

    def __call__(self, body: dict[str, Any]) -> None:
        self.pool.submit(self.write, body)

    def _call(self, method: str, path: str, body: Any, content_type: str) -> None:
        request = self.api.param_serialize(
            method,
            path,
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request)
        text = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {text[:500]!r}")

    def write(self, body: dict[str, Any]) -> None:
        from llmops.api.trainingrun import TrainingRun
        from llmops.decide import trainingrun as decide
        from llmops.decide.status import now

        run = TrainingRun.model_validate(body)
        decision = decide.decide(run, run.status, decide.Observed(body, self.dataset), now())
        meta = body["metadata"]
        apply = "application/apply-patch+yaml"
        for child in decision.children:
            manifest = child.manifest
            group = manifest["apiVersion"]
            base = f"/api/{group}" if "/" not in group else f"/apis/{group}"
            plural = PLURALS[manifest["kind"]]
            path = f"{base}/namespaces/{self.namespace}/{plural}/{manifest['metadata']['name']}"
            self._call("PATCH", f"{path}?fieldManager=llmops&force=true", manifest, apply)
        status = {**decision.status.to_dict(), "observedGeneration": meta["generation"]}
        runs = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/trainingruns"
        merge = "application/merge-patch+json"
        self._call("PATCH", f"{runs}/{meta['name']}/status", {"status": status}, merge)
        for event in decision.events:
            reference = {k: body[k] for k in ("apiVersion", "kind")}
            reference.update({k: meta[k] for k in ("name", "namespace", "uid")})
            posted = {
                "metadata": {"generateName": f"{meta['name']}."},
                "involvedObject": reference,
                "reason": event.reason,
                "message": event.message,
                "type": event.type,
                "source": {"component": "llmops-operator"},
            }
            events = f"/api/v1/namespaces/{self.namespace}/events"
            self._call("POST", events, posted, "application/json")


PLURALS = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Job": "jobs",
}


def run_round(
    custom: Any,
    api: Any,
    port: int,
    namespace: str,
    plural: str,
    count: int,
    make: Callable[[str], dict[str, Any]],
    after_create: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    before = scrape(port) if port else {}
    created_at: dict[str, float] = {}
    done_at: dict[str, float] = {}
    lock = threading.Lock()
    watcher = watch_reports(api, namespace, plural, count, done_at)

    def create(index: int) -> None:
        name = f"r{index:04d}"
        started = time.monotonic()
        made = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, make(name))
        with lock:
            created_at[name] = started
        if after_create is not None:
            after_create(made)

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(count)))
    watcher.join(900)
    after = scrape(port) if port else {}
    # Reported means its children were written first; check that they exist all the same.
    missing = children_missing(api, namespace, plural, sorted(done_at))
    for name in missing:
        del done_at[name]
    latencies = [done_at[n] - created_at[n] for n in done_at]
    reconciles = after.get("llmops_operator_reconcile_duration_seconds_count", 0) - before.get(
        "llmops_operator_reconcile_duration_seconds_count", 0
    )
    requests = after.get("bench_api_requests_total", 0) - before.get("bench_api_requests_total", 0)
    return {
        "count": count,
        "done": len(done_at),
        "childrenMissing": missing,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": percentile(latencies, 0.99) if latencies else float("nan"),
        "all_done_s": max(done_at.values()) - started if done_at else float("nan"),
        "reconciles": reconciles,
        "requests": requests,
        "calls": calls_between(before, after),
    }


def report(what: str, result: dict[str, Any], pid: int | None) -> None:
    per = result["requests"] / result["reconciles"] if result["reconciles"] else float("nan")
    rss = peak_rss_mb(pid) if pid else float("nan")
    absent = len(result["childrenMissing"])
    missing = f" (children missing: {absent})" if absent else ""
    print(
        f"{what}: {result['done']}/{result['count']} complete{missing}; "
        f"creation -> children+status p50 {result['p50']:.2f}s p99 {result['p99']:.2f}s "
        f"(last after {result['all_done_s']:.1f}s); operator peak RSS {rss:.0f} MB; "
        f"{result['requests']:.0f} API requests / {result['reconciles']:.0f} reconciles = "
        f"{per:.1f} per reconcile; per resource: "
        + ", ".join(f"{k} {v / result['count']:.2f}" for k, v in sorted(result["calls"].items())),
        flush=True,
    )
    print("json " + json.dumps({**result, "what": what}), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
