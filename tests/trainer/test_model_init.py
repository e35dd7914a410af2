"""The model initializer as its init container runs it: `python -m llmops_trainer.model_init`
with the pod's environment, against a tiny Llama folder on disk, a local S3 (moto), a local
HTTPS server and a local server that speaks the Hugging Face Hub's API. Nothing leaves the
machine."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures.fake_hub import COMMIT, FakeHub, serve
from fixtures.tiny_llama import build

from llmops.api.workload import (
    MODEL_INIT_MODULE,
    MODEL_INIT_REASONS,
    MODEL_INIT_STAGE,
    Env,
    FailureReport,
    read_record,
)

MARKER = ".llmops-source.json"
TIMEOUT = 120
# What a developer's shell may hold (a token, an endpoint, offline mode) stays out of the pod.
INHERITED_NOT = ("HF_", "AWS_", "LLMOPS_", "JOB_COMPLETION_INDEX")


# -- running the initializer ----------------------------------------------------------------------


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    report: FailureReport | None  # the termination message

    def failed_with(self, reason: str) -> FailureReport:
        assert reason in MODEL_INIT_REASONS
        assert self.code == 1, self.stdout + self.stderr
        assert self.report is not None, f"no termination message; stderr: {self.stderr}"
        assert self.report.stage == MODEL_INIT_STAGE
        assert self.report.reason == reason, self.report
        assert "\n" not in self.report.message
        assert self.report.message in self.stderr
        return self.report


class Init:
    """One init container: started with its env, finished into a Result."""

    def __init__(self, work: Path, uri: str, folder: Path, *args: str, **env: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.termination = work / "termination-log"
        variables = {
            **{k: v for k, v in os.environ.items() if not k.startswith(INHERITED_NOT)},
            Env.PRETRAINED_URI: uri,
            Env.PRETRAINED_DIR: str(folder),
            Env.TERMINATION_LOG: str(self.termination),
            "HF_HOME": str(work / "hf-home"),  # nothing lands in the real home
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", MODEL_INIT_MODULE, *args],
            env=variables,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> Result:
        stdout, stderr = self.process.communicate(timeout=TIMEOUT)
        text = self.termination.read_text() if self.termination.exists() else None
        return Result(self.process.returncode, stdout, stderr, read_record(FailureReport, text))


def run_init(work: Path, uri: str, folder: Path, *args: str, **env: str) -> Result:
    return Init(work, uri, folder, *args, **env).result()


def run_all(inits: Mapping[str, Init]) -> dict[str, Result]:
    """Several independent init containers at once (each imports transformers: seconds)."""
    return {name: init.result() for name, init in inits.items()}


def files_of(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def looks_complete(parent: Path) -> list[Path]:
    """Every marker under `parent`: what a later run would take for a finished download."""
    return sorted(parent.rglob(MARKER))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def model_files(model: Path) -> dict[str, bytes]:
    return files_of(model)


# -- local models: verified in place ----------------------------------------------------------


def variant(model: Path, folder: Path, *, drop: tuple[str, ...] = (), **config: Any) -> Path:
    shutil.copytree(model, folder)
    for name in drop:
        (folder / name).unlink()
    if config:
        original = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**original, **config}))
    return folder


@pytest.fixture(scope="module")
def local(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result]:
    """Each case a folder mounted into the pod; all run at once."""
    root = tmp_path_factory.mktemp("local")
    tokenizer = ("tokenizer.json", "tokenizer_config.json")
    folders = {
        "ok": model,
        "no-config": variant(model, root / "no-config", drop=("config.json",)),
        "unknown-type": variant(model, root / "unknown-type", model_type="not-a-model"),
        "unknown-class": variant(
            model, root / "unknown-class", architectures=["NotAModelForCausalLM"]
        ),
        "no-tokenizer": variant(model, root / "no-tokenizer", drop=tokenizer),
        "no-weights": variant(model, root / "no-weights", drop=("model.safetensors",)),
    }
    inits = {
        name: Init(root / f"work-{name}", str(folder), folder) for name, folder in folders.items()
    }
    no_weights = folders["no-weights"]
    inits["no-weights-tokenizer-only"] = Init(
        root / "work-tok", "pvc://models/tiny", no_weights, "--tokenizer-only"
    )
    inits["missing-folder"] = Init(root / "work-missing", "pvc://models/x", root / "nowhere")
    return run_all(inits)


def test_a_local_model_is_verified_in_place(local: dict[str, Result], model: Path) -> None:
    result = local["ok"]
    assert result.code == 0, result.stderr
    assert result.report is None
    assert "LlamaForCausalLM (llama)" in result.stdout
    assert "tokenizer.json" in result.stdout and "model.safetensors" in result.stdout
    assert not (model / MARKER).exists()  # read-only in a pod: nothing is written there


def test_a_model_without_config_is_refused(local: dict[str, Result]) -> None:
    assert "config.json" in local["no-config"].failed_with("MissingModelConfig").message


def test_an_unknown_model_type_or_class_is_refused(local: dict[str, Result]) -> None:
    assert "not-a-model" in local["unknown-type"].failed_with("UnknownArchitecture").message
    report = local["unknown-class"].failed_with("UnknownArchitecture")
    assert "NotAModelForCausalLM" in report.message


def test_a_model_without_tokenizer_is_refused(local: dict[str, Result]) -> None:
    assert "tokenizer" in local["no-tokenizer"].failed_with("MissingTokenizer").message


def test_weights_are_needed_unless_only_the_tokenizer_is(local: dict[str, Result]) -> None:
    assert "safetensors" in local["no-weights"].failed_with("MissingWeights").message
    tokenizer_only = local["no-weights-tokenizer-only"]
    assert tokenizer_only.code == 0, tokenizer_only.stderr
    assert "tokenizer only" in tokenizer_only.stdout


def test_a_missing_local_folder_is_not_found(local: dict[str, Result]) -> None:
    assert "pvc://models/x" in local["missing-folder"].failed_with("ModelNotFound").message


# -- s3:// ---------------------------------------------------------------------------------


@dataclass
class S3:
    endpoint: str
    server: Any
    env: dict[str, str]


@pytest.fixture
def s3(model_files: dict[str, bytes]) -> Iterator[S3]:
    """A moto S3 server with the model under s3://models/tiny/."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    client.create_bucket(Bucket="models")
    for name, data in model_files.items():
        client.put_object(Bucket="models", Key=f"tiny/{name}", Body=data)
    client.put_object(Bucket="models", Key="other/readme.txt", Body=b"not a model")
    try:
        yield S3(endpoint, server, env)
    finally:
        server.stop()


def test_s3_fetch_replaces_a_partial_folder_and_is_reused_offline(
    s3: S3, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    target = tmp_path / "checkpoints" / "pretrained"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{")  # an earlier pod died mid-way
    result = run_init(tmp_path / "first", "s3://models/tiny", target, **s3.env)
    assert result.code == 0, result.stderr
    assert f"({len(model_files)} files, " in result.stdout
    assert files_of(target) == model_files
    marker = json.loads((target / MARKER).read_text())
    assert marker["uri"] == "s3://models/tiny" and marker["tokenizerOnly"] is False
    assert [p.name for p in target.parent.iterdir()] == ["pretrained"]  # no temporary left

    (target / "model.safetensors").unlink()  # damaged since: fetched again
    repaired = run_init(tmp_path / "repair", "s3://models/tiny", target, **s3.env)
    assert repaired.code == 0, repaired.stderr
    assert "MissingWeights" in repaired.stdout and "fetching again" in repaired.stdout
    assert files_of(target) == model_files

    s3.server.stop()  # a second pod (or a restarted gang) needs no network
    again = run_init(tmp_path / "second", "s3://models/tiny", target, **s3.env)
    assert again.code == 0, again.stderr
    assert "reused" in again.stdout
    assert files_of(target) == model_files


def test_s3_tokenizer_only_and_an_empty_prefix(s3: S3, tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer"
    results = run_all(
        {
            "tokenizer": Init(
                tmp_path / "tok", "s3://models/tiny/", tokenizer, "--tokenizer-only", **s3.env
            ),
            "empty": Init(tmp_path / "empty", "s3://models/nothing", tmp_path / "e", **s3.env),
            "bucket": Init(tmp_path / "bucket", "s3://no-bucket/m", tmp_path / "b", **s3.env),
        }
    )
    assert results["tokenizer"].code == 0, results["tokenizer"].stderr
    fetched = set(files_of(tokenizer))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= fetched
    assert not [name for name in fetched if name.endswith(".safetensors")]
    assert "s3://models/nothing" in results["empty"].failed_with("ModelNotFound").message
    assert "NoSuchBucket" in results["bucket"].failed_with("ModelNotFound").message
    assert looks_complete(tmp_path) == [tokenizer / MARKER]


def test_any_model_fetches_a_served_folder_without_the_hugging_face_checks(
    s3: S3, tmp_path: Path
) -> None:
    """A ModelDeployment serving an s3:// checkpoint: not a Hugging Face folder, fetched as is."""
    served = tmp_path / "served"
    results = run_all(
        {
            "strict": Init(tmp_path / "a", "s3://models/other/", tmp_path / "s", **s3.env),
            "any": Init(tmp_path / "b", "s3://models/other/", served, "--any-model", **s3.env),
        }
    )
    results["strict"].failed_with("MissingModelConfig")
    assert results["any"].code == 0, results["any"].stderr
    assert files_of(served) == {"readme.txt": b"not a model"}


# -- https:// ------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that the initializer trusts through SSL_CERT_FILE."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert, key_file = folder / "cert.pem", folder / "key.pem"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key_file


@pytest.fixture(scope="module")
def https(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The model folder over HTTPS at https://127.0.0.1:<port>/tiny; yields the base URL and
    the certificate to trust."""
    pytest.importorskip("cryptography")  # the dev extra has it
    root = tmp_path_factory.mktemp("https")
    shutil.copytree(model, root / "tiny")
    cert, key = self_signed(root)
    handler = type(
        "Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root))
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/tiny", cert
    finally:
        server.shutdown()


def listing(model_files: Mapping[str, bytes], **wrong: str) -> str:
    return json.dumps(
        [{"name": n, "sha256": wrong.get(n, sha256(d))} for n, d in model_files.items()]
    )


def test_https_files_are_checked_against_their_digests(
    https: tuple[str, Path], tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    base, cert = https
    trust = {"SSL_CERT_FILE": str(cert)}
    good, bad, missing = tmp_path / "good" / "m", tmp_path / "bad" / "m", tmp_path / "missing" / "m"
    wrong = "0" * 64
    results = run_all(
        {
            "good": Init(
                tmp_path / "w1", base, good, LLMOPS_PRETRAINED_FILES=listing(model_files), **trust
            ),
            "bad": Init(
                tmp_path / "w2",
                base,
                bad,
                LLMOPS_PRETRAINED_FILES=listing(model_files, **{"model.safetensors": wrong}),
                **trust,
            ),
            "missing": Init(
                tmp_path / "w3",
                base,
                missing,
                LLMOPS_PRETRAINED_FILES=json.dumps([{"name": "nope.json", "sha256": wrong}]),
                **trust,
            ),
        }
    )
    assert results["good"].code == 0, results["good"].stderr
    assert files_of(good) == model_files
    report = results["bad"].failed_with("ChecksumMismatch")
    actual = sha256(model_files["model.safetensors"])
    assert "model.safetensors" in report.message
    assert wrong in report.message and actual in report.message
    assert not bad.exists() and list(bad.parent.iterdir()) == []  # nothing half-done left
    assert "404" in results["missing"].failed_with("ModelNotFound").message
    assert looks_complete(tmp_path) == [good / MARKER]


# -- hf:// ---------------------------------------------------------------------------------


@pytest.fixture
def hub(model_files: dict[str, bytes]) -> Iterator[FakeHub]:
    # The same weights once more in the old format: a download prefers the safetensors.
    files = {**model_files, "pytorch_model.bin": b"old format"}
    with serve(FakeHub(models={"org/tiny-llama": files})) as server:
        yield server


def test_hf_snapshot_from_a_mirror(
    hub: FakeHub, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    env = {"HF_ENDPOINT": hub.url}
    target, tokenizer = tmp_path / "model", tmp_path / "tokenizer"
    results = run_all(
        {
            "model": Init(tmp_path / "w1", "hf://org/tiny-llama@main", target, **env),
            "tokenizer": Init(
                tmp_path / "w2", "hf://org/tiny-llama", tokenizer, "--tokenizer-only", **env
            ),
            "unknown": Init(tmp_path / "w3", "hf://org/no-such-model", tmp_path / "x", **env),
            "revision": Init(tmp_path / "w4", "hf://org/tiny-llama@v9", tmp_path / "y", **env),
        }
    )
    assert results["model"].code == 0, results["model"].stderr
    assert files_of(target) == model_files  # no pytorch_model.bin, no .cache bookkeeping
    assert hub.requests[f"GET /org/tiny-llama/resolve/{COMMIT}/pytorch_model.bin"] == 0
    marker = json.loads((target / MARKER).read_text())
    assert marker["commit"] == COMMIT and marker["revision"] == "main"

    assert results["tokenizer"].code == 0, results["tokenizer"].stderr
    assert not [n for n in files_of(tokenizer) if n.endswith((".safetensors", ".bin"))]
    assert "tokenizer.json" in files_of(tokenizer)

    report = results["unknown"].failed_with("ModelNotFound")
    assert "org/no-such-model" in report.message and "HF_TOKEN" in report.message
    assert "'v9'" in results["revision"].failed_with("ModelNotFound").message
    assert looks_complete(tmp_path) == [target / MARKER, tokenizer / MARKER]


# -- a gang on a shared volume -------------------------------------------------------------


def test_gang_pods_wait_for_pod_zero(
    hub: FakeHub, tmp_path: Path, model_files: dict[str, bytes]
) -> None:
    shared = tmp_path / "checkpoints" / "pretrained"
    env = {"HF_ENDPOINT": hub.url, "LLMOPS_PRETRAINED_SHARED": "1"}
    uri = "hf://org/tiny-llama"
    follower = Init(tmp_path / "pod-1", uri, shared, JOB_COMPLETION_INDEX="1", **env)
    time.sleep(1.0)  # pod 1 is waiting before pod 0 starts
    assert follower.process.poll() is None
    hub.requests.clear()
    leader = run_init(tmp_path / "pod-0", uri, shared, JOB_COMPLETION_INDEX="0", **env)
    assert leader.code == 0, leader.stderr
    waited = follower.result()
    assert waited.code == 0, waited.stderr
    assert "pod 0 fetched" in waited.stdout
    # Only pod 0 talked to the Hub: one model info, one file each.
    assert hub.requests[f"GET /org/tiny-llama/resolve/{COMMIT}/model.safetensors"] == 1
    assert sum(n for r, n in hub.requests.items() if r.startswith("GET /api/models")) == 2
    assert files_of(shared) == model_files


def test_a_gang_pod_gives_up_when_pod_zero_never_finishes(tmp_path: Path) -> None:
    started = time.monotonic()
    result = run_init(
        tmp_path,
        "s3://models/tiny",
        tmp_path / "never",
        "--wait-seconds",
        "1",
        LLMOPS_PRETRAINED_SHARED="1",
        JOB_COMPLETION_INDEX="2",
    )
    report = result.failed_with("ModelFetchFailed")
    assert "pod 2 waited 1 s for pod 0" in report.message
    assert time.monotonic() - started < 30
