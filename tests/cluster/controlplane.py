"""A real Kubernetes control plane on loopback for tests: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok (simulated nodes), built from upstream Go
modules by build_components.py. No containers, no downloads.

    with ControlPlane.start(workdir) as cp:
        ... cp.kubeconfig ...

Every process runs in its own process group, logs to workdir/logs/, and is stopped on exit,
whatever happened inside the block.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ctypes
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from build_components import component_bin_dirs
from pki import CertificateAuthority, KeyPair, write_kubeconfig, write_service_account_key

SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Two simulated node pools. On `kwok-node-*` a Job's pods complete as soon as they run (kwok's
# own stages). `kwok-hold-*` is tainted; pods that tolerate it and select it keep running
# until a test ends them by writing their status, as a kubelet would (success, crash, ...).
HOLD_POOL_LABEL = "llmops.dev/kwok-pool"
HOLD_TOLERATION = {
    "key": HOLD_POOL_LABEL,
    "operator": "Equal",
    "value": "hold",
    "effect": "NoSchedule",
}
START_TIMEOUT = 120.0
# Kueue manages Jobs (and serves its Job webhooks) only in namespaces with this label, so
# the rest of the suite never meets it, running or not.
KUEUE_NAMESPACE_LABEL = "llmops.dev/kueue-managed"
KUEUE_NAMESPACE = "kueue-system"
# What Kueue's certificate rotator expects: its webhook Service's DNS name, the CA's name and
# the Secret it keeps them in (its defaults); and the CRDs it converts between versions.
KUEUE_SERVICE_DNS = f"kueue-webhook-service.{KUEUE_NAMESPACE}.svc"
KUEUE_CA_NAME = "kueue-ca"
KUEUE_CERT_SECRET = "kueue-webhook-server-cert"
KUEUE_CONVERTED = ("localqueues", "clusterqueues", "workloads", "cohorts", "multikueueclusters")
# Of Kueue's admission webhooks, those for its own API and for batch/v1 Jobs (the one
# integration enabled here): the others would intercept every pod, Deployment, ...
KUEUE_WEBHOOK_GROUPS = {"kueue.x-k8s.io", "batch"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel kills it if the test process dies, so even
    a SIGKILLed pytest leaves no control plane process behind."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, alive: Callable[[], None] | None = None
) -> None:
    """Poll `check` until true; `alive` raises if a process we wait on has died."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        with contextlib.suppress(OSError, urllib.error.URLError):
            if check():
                return
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]
    args: list[str] = field(default_factory=list)

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; last log lines:\n" + self.tail()
            )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self.log.close()


@dataclass
class ControlPlane:
    workdir: Path
    bins: dict[str, Path]
    processes: list[Process] = field(default_factory=list)
    server: str = ""
    kubeconfig: Path = Path()
    ca: Path = Path()
    admin: KeyPair | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def start(cls, workdir: Path, nodes: int = 2) -> Iterator[ControlPlane]:
        plane = cls(workdir=workdir, bins=component_bin_dirs())
        try:
            plane._start(nodes)
            yield plane
        finally:
            plane.stop()

    def stop(self) -> None:
        # Reverse start order: clients of the API server go first, etcd last.
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def _spawn(self, name: str, args: list[str]) -> Process:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(
            [str(self.bins[name]), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: stop() kills it and its children
            preexec_fn=_die_with_parent,
        )
        process = Process(name, popen, log_path, log, list(args))
        self.processes.append(process)
        return process

    def restart_apiserver(self) -> float:
        """Stop kube-apiserver and start it again with the same flags (etcd keeps the state):
        every client's connections and watches break. Seconds until it is ready again."""
        index, old = next(
            (i, p) for i, p in enumerate(self.processes) if p.name == "kube-apiserver"
        )
        started = time.monotonic()
        old.stop()
        self.processes.remove(old)
        new = self._spawn("kube-apiserver", old.args)
        self.processes.remove(new)
        self.processes.insert(index, new)  # stop() keeps the reverse start order
        assert self.admin is not None
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        wait_for(
            "kube-apiserver /readyz after a restart",
            lambda: _http_ok(f"{self.server}/readyz", context),
            START_TIMEOUT,
            new.check_alive,
        )
        return time.monotonic() - started

    def _start(self, nodes: int) -> None:
        pki_dir = self.workdir / "pki"
        pki_dir.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority(pki_dir)
        self.ca = ca.cert_path
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=[
                "127.0.0.1",
                "localhost",
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
        )
        sa_key = write_service_account_key(pki_dir / "service-account.key")
        self.admin = ca.issue("admin", "llmops-test-admin", "system:masters")

        etcd_port = free_port()
        etcd = self._spawn(
            "etcd",
            [
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-url=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-url=http://127.0.0.1:{free_port()}",
            ],
        )
        wait_for(
            "etcd",
            lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"),
            START_TIMEOUT,
            etcd.check_alive,
        )

        api_port = free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        apiserver = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.cert_path}",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # The loopback address cannot be a Service endpoint; nothing here needs it.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={pki_dir}",
                "--profiling=false",
            ],
        )
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig", self.server, ca.cert_path, self.admin, "admin"
        )
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        wait_for(
            "kube-apiserver /readyz",
            lambda: _http_ok(f"{self.server}/readyz", context),
            START_TIMEOUT,
            apiserver.check_alive,
        )

        # The controller manager and scheduler use their own well-known identities, so the
        # bootstrap RBAC roles apply to them exactly as in a kubeadm cluster.
        cm_kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig",
            self.server,
            ca.cert_path,
            ca.issue("controller-manager", "system:kube-controller-manager"),
            "system:kube-controller-manager",
        )
        cm_port = free_port()
        controller_manager = self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={cm_kubeconfig}",
                f"--authentication-kubeconfig={cm_kubeconfig}",
                f"--authorization-kubeconfig={cm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                f"--service-account-private-key-file={sa_key}",
                f"--root-ca-file={ca.cert_path}",
                "--use-service-account-credentials=true",
                f"--cluster-cidr={POD_CIDR}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        scheduler_kubeconfig = write_kubeconfig(
            self.workdir / "scheduler.kubeconfig",
            self.server,
            ca.cert_path,
            ca.issue("scheduler", "system:kube-scheduler"),
            "system:kube-scheduler",
        )
        scheduler_port = free_port()
        scheduler = self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={scheduler_kubeconfig}",
                f"--authentication-kubeconfig={scheduler_kubeconfig}",
                f"--authorization-kubeconfig={scheduler_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={scheduler_port}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        kwok = self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--config={self._kwok_stages(nodes)}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--cidr={POD_CIDR}",
                "--node-ip=10.244.0.1",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # their serving certs are self-signed
        wait_for(
            "kube-controller-manager /healthz",
            lambda: _http_ok(f"https://127.0.0.1:{cm_port}/healthz", insecure),
            START_TIMEOUT,
            controller_manager.check_alive,
        )
        wait_for(
            "kube-scheduler /healthz",
            lambda: _http_ok(f"https://127.0.0.1:{scheduler_port}/healthz", insecure),
            START_TIMEOUT,
            scheduler.check_alive,
        )
        kwok.check_alive()
        self._create_nodes(nodes, context)
        for process in self.processes:
            process.check_alive()

    def _kwok_stages(self, nodes: int) -> Path:
        """kwok's stages, except that Job pods on the hold pool do not complete by themselves."""
        documents = list(yaml.safe_load_all(self.bins["kwok-stages.yaml"].read_text()))
        for stage in documents:
            if stage["metadata"]["name"] == "pod-complete":
                stage["spec"]["selector"]["matchExpressions"].append(
                    {
                        "key": ".spec.nodeName",
                        "operator": "NotIn",
                        "values": [f"kwok-hold-{i}" for i in range(nodes)],
                    }
                )
        path = self.workdir / "kwok-stages.yaml"
        path.write_text(yaml.safe_dump_all(documents))
        return path

    def _create_nodes(self, count: int, context: ssl.SSLContext) -> None:
        """Simulated nodes with 8 GPUs each, managed by kwok: `count` in each pool."""
        names = [f"kwok-node-{i}" for i in range(count)] + [f"kwok-hold-{i}" for i in range(count)]
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": "8"}
        for name in names:
            hold = name.startswith("kwok-hold")
            taint = {k: v for k, v in HOLD_TOLERATION.items() if k != "operator"}
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        HOLD_POOL_LABEL: "hold" if hold else "complete",
                    },
                },
                "spec": {"taints": [taint] if hold else []},
                "status": {"capacity": capacity, "allocatable": capacity},
            }
            request = urllib.request.Request(
                f"{self.server}/api/v1/nodes",
                data=json.dumps(node).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, context=context, timeout=10).close()

        def all_ready() -> bool:
            with urllib.request.urlopen(
                f"{self.server}/api/v1/nodes", context=context, timeout=10
            ) as response:
                items = json.load(response)["items"]
            ready = [
                n
                for n in items
                for c in n.get("status", {}).get("conditions", [])
                if c["type"] == "Ready" and c["status"] == "True"
            ]
            return len(ready) >= len(names)

        wait_for("kwok nodes Ready", all_ready, START_TIMEOUT, self.processes[-1].check_alive)

    # -- Kueue ------------------------------------------------------------------------------

    def start_kueue(self) -> None:
        """Kueue's controller manager (built by build_components.py) with its CRDs and the
        admission webhooks for its API and batch/v1 Jobs, managing the Jobs of namespaces
        labelled KUEUE_NAMESPACE_LABEL=true. Stopped with the rest of the control plane.

        The API server reaches the webhooks on loopback (`url`, not a Service). Kueue's
        internal certificate management stays on, but finds a valid certificate already in
        its Secret: one that pki.py made for both the Service's name and 127.0.0.1, so the
        rotator keeps it and only injects its CA where the API server needs it."""
        if self.admin is None:
            raise RuntimeError("the control plane is not started")
        if "kueue" not in self.bins:
            raise RuntimeError("kueue is not built: run `python tests/cluster/build_components.py`")
        workdir = self.workdir / "kueue"
        cert_dir = workdir / "certs"
        cert_dir.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority(
            workdir, KUEUE_CA_NAME, rsa_key=True, validity=datetime.timedelta(days=3650)
        )
        serving = ca.issue(
            "webhook", KUEUE_SERVICE_DNS, server_names=[KUEUE_SERVICE_DNS, "127.0.0.1"]
        )
        (cert_dir / "tls.crt").write_bytes(serving.cert.read_bytes())
        (cert_dir / "tls.key").write_bytes(serving.key.read_bytes())
        ca_bundle = base64.b64encode(ca.cert_path.read_bytes()).decode()
        webhook_port = free_port()
        webhook_url = f"https://127.0.0.1:{webhook_port}"

        self._api("POST", "/api/v1/namespaces", {"metadata": {"name": KUEUE_NAMESPACE}})
        secret = {
            "metadata": {"name": KUEUE_CERT_SECRET},
            "data": {
                name: base64.b64encode(path.read_bytes()).decode()
                for name, path in (
                    ("ca.crt", ca.cert_path),
                    ("ca.key", ca.key_path),
                    ("tls.crt", serving.cert),
                    ("tls.key", serving.key),
                )
            },
        }
        self._api("POST", f"/api/v1/namespaces/{KUEUE_NAMESPACE}/secrets", secret)
        for crd in _kueue_crds(self.bins["kueue-crds.yaml"], webhook_url, ca_bundle):
            self._api("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        for config in _kueue_webhooks(self.bins["kueue-webhooks.yaml"], webhook_url, ca_bundle):
            plural = config["kind"].lower() + "s"
            self._api("POST", f"/apis/admissionregistration.k8s.io/v1/{plural}", config)

        health_port = free_port()
        config_path = workdir / "config.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "config.kueue.x-k8s.io/v1beta2",
                    "kind": "Configuration",
                    "namespace": KUEUE_NAMESPACE,
                    "health": {"healthProbeBindAddress": f"127.0.0.1:{health_port}"},
                    "metrics": {"bindAddress": "0"},
                    "webhook": {
                        "host": "127.0.0.1",
                        "port": webhook_port,
                        "certDir": str(cert_dir),
                    },
                    "leaderElection": {"leaderElect": False},
                    "internalCertManagement": {
                        "enable": True,
                        "webhookServiceName": KUEUE_SERVICE_DNS.split(".")[0],
                        "webhookSecretName": KUEUE_CERT_SECRET,
                    },
                    "managedJobsNamespaceSelector": {
                        "matchLabels": {KUEUE_NAMESPACE_LABEL: "true"}
                    },
                    "integrations": {"frameworks": ["batch/job"]},
                }
            )
        )
        kueue = self._spawn(
            "kueue",
            [
                f"--config={config_path}",
                f"--kubeconfig={self.kubeconfig}",
                # Its on-demand visibility API server would take a fixed port.
                "--feature-gates=VisibilityOnDemand=false",
            ],
        )
        wait_for(
            "kueue /readyz",
            lambda: _http_ok(f"http://127.0.0.1:{health_port}/readyz"),
            START_TIMEOUT,
            kueue.check_alive,
        )
        # Ready includes the certificate bootstrap; the API server calling the webhooks
        # (a dry-run create passes both of a ResourceFlavor's) is what the tests need.
        flavor = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor"}
        flavor["metadata"] = {"name": "webhook-check"}
        wait_for(
            "Kueue's webhooks",
            lambda: self._api(
                "POST", "/apis/kueue.x-k8s.io/v1beta2/resourceflavors?dryRun=All", flavor
            ),
            START_TIMEOUT,
            kueue.check_alive,
        )

    def _api(self, method: str, path: str, body: dict[str, object]) -> bool:
        """One request as the admin (True once done); an object that already exists is left
        as it is."""
        assert self.admin is not None
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        request = urllib.request.Request(
            f"{self.server}{path}",
            data=json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, context=context, timeout=30).close()
        except urllib.error.HTTPError as error:
            if error.code != 409:
                raise
        return True

    def logs_tail(self) -> str:
        return "\n\n".join(f"== {p.name} ==\n{p.tail()}" for p in self.processes)


def _kueue_crds(path: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's CRDs, with the conversion webhooks its kustomize build adds, served on `url`."""
    crds: list[dict[str, Any]] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for crd in crds:
        if crd["spec"]["names"]["plural"] in KUEUE_CONVERTED:
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {"url": f"{url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"],
                },
            }
    return crds


def _kueue_webhooks(path: Path, url: str, ca_bundle: str) -> list[dict[str, Any]]:
    """Kueue's webhook configurations under the names its rotator looks for, with the
    webhooks for its own API and for Jobs, pointed at `url`. Job webhooks only see the
    namespaces Kueue manages."""
    configs = []
    for source in yaml.safe_load_all(path.read_text()):
        if not source:
            continue
        config = copy.deepcopy(source)
        config["metadata"] = {"name": f"kueue-{source['metadata']['name']}"}
        config["webhooks"] = []
        for webhook in source["webhooks"]:
            groups = {g for rule in webhook["rules"] for g in rule["apiGroups"]}
            if not groups <= KUEUE_WEBHOOK_GROUPS:
                continue
            service = webhook["clientConfig"]["service"]
            webhook["clientConfig"] = {"url": f"{url}{service['path']}", "caBundle": ca_bundle}
            if "batch" in groups:
                webhook["namespaceSelector"] = {"matchLabels": {KUEUE_NAMESPACE_LABEL: "true"}}
            config["webhooks"].append(webhook)
        configs.append(config)
    return configs


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, context=context, timeout=5) as response:
        return bool(response.status == 200)
