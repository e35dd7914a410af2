"""The model initializer: the init container that makes an open-weights model (Hugging Face
format) ready in `Env.PRETRAINED_DIR` before a training or data pod starts.

    python -m llmops_trainer.model_init [--tokenizer-only] [--wait-seconds N]

- A local model (an absolute path in the image, a `pvc://` claim mounted read-only) is
  verified in place; nothing is downloaded.
- A remote model (`s3://`, `https://`, `hf://`) is downloaded into a temporary sibling of the
  folder, verified, marked complete (MARKER, written last) and renamed into place, so that a
  crash never leaves a folder that looks complete. A folder whose marker names the same
  source is verified and reused without the network (a restarted gang, a second Dataset).
- On a volume the whole gang shares (`Env.PRETRAINED_SHARED` = "1"), only pod 0 downloads;
  the other pods wait for its marker.

A failure leaves a `FailureReport` (stage `model-init`, one of `MODEL_INIT_REASONS`) as the
termination message, which the operator turns into the resource's Failed condition.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from llmops.api.workload import MODEL_INIT_STAGE, Env
from llmops_trainer.termination import write_failure

MARKER = ".llmops-source.json"
POLL_SECONDS = 2.0
DEFAULT_WAIT_SECONDS = 3600.0
CHUNK = 1 << 20
MESSAGE_LIMIT = 1000  # a termination message keeps 4096 bytes: room for the JSON around it
TOKEN_HINT = "a token may be needed: set credentialsSecret to a Secret with HF_TOKEN"

# What a tokenizer needs (and the config, whose model_type picks the tokenizer class).
TOKENIZER_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece*.model",
    "vocab*",
    "merges*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
# Vocabulary files that make a tokenizer_config.json usable without a tokenizer.json.
VOCAB_PATTERNS = ("vocab*", "merges*", "*.model", "*.tiktoken")
# Weight formats skipped when a repository also has safetensors: the same weights again.
OTHER_WEIGHT_PATTERNS = (
    "*.bin",
    "*.pt",
    "*.pth",
    "*.h5",
    "*.msgpack",
    "*.ckpt",
    "*.onnx",
    "*.onnx_data",
    "onnx/*",
)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class InitError(Exception):
    """A failure with the reason the TrainingRun or Dataset condition shows."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Source:
    """The model to make ready, from the init container's environment."""

    uri: str
    files: tuple[tuple[str, str], ...]  # https: (name, sha256)
    folder: Path
    tokenizer_only: bool
    shared: bool
    any_model: bool  # any folder the server loads (an llmops checkpoint too): no HF checks
    index: str | None  # JOB_COMPLETION_INDEX: the pod's place in an Indexed Job

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, tokenizer_only: bool, any_model: bool = False
    ) -> Source:
        uri = env.get(Env.PRETRAINED_URI, "")
        folder = env.get(Env.PRETRAINED_DIR, "")
        if not uri or not folder:
            raise InitError(
                "ModelFetchFailed", f"{Env.PRETRAINED_URI} and {Env.PRETRAINED_DIR} must be set"
            )
        try:
            listed = json.loads(env.get(Env.PRETRAINED_FILES) or "[]")
            files = tuple((str(f["name"]), str(f["sha256"]).lower()) for f in listed)
        except (ValueError, TypeError, KeyError) as error:
            raise InitError(
                "ModelFetchFailed", f"{Env.PRETRAINED_FILES} is not a list of {{name, sha256}}"
            ) from error
        return cls(
            uri=uri,
            files=files,
            folder=Path(folder),
            tokenizer_only=tokenizer_only,
            shared=env.get(Env.PRETRAINED_SHARED) == "1",
            any_model=any_model,
            index=env.get("JOB_COMPLETION_INDEX"),
        )

    @property
    def local(self) -> bool:
        return self.uri.startswith(("/", "pvc://"))

    @property
    def follower(self) -> bool:
        """Another pod (index 0) of the gang downloads into the shared folder."""
        return self.shared and self.index not in (None, "", "0")

    def identity(self) -> dict[str, Any]:
        """What the marker records to recognise this source's download."""
        return {
            "uri": self.uri,
            "files": [{"name": n, "sha256": s} for n, s in self.files],
            "tokenizerOnly": self.tokenizer_only,
        }


# -- the steps ----------------------------------------------------------------------------------


def initialize(source: Source, wait_seconds: float) -> str:
    """Make the model ready and verified; a one-line summary of what was done."""
    started = time.monotonic()
    if source.local:
        if not source.folder.is_dir():
            raise InitError("ModelNotFound", f"{source.uri}: no folder at {source.folder}")
        return f"verified {source.uri} in place at {source.folder}: {verify(source)}"
    if is_complete(source.folder, source):
        try:
            return f"reused the download of {source.uri} in {source.folder}: {verify(source)}"
        except InitError as error:
            if source.follower:  # only pod 0 may replace it
                raise
            # Damaged since (a file deleted by hand): fetch it again rather than fail forever.
            print(f"model-init: {error.reason}: {error.message}; fetching again", flush=True)
    if source.follower:
        wait_for_leader(source, wait_seconds)
        waited = time.monotonic() - started
        return f"pod 0 fetched {source.uri} ({waited:.1f} s waited): {verify(source)}"
    files, size, what = fetch_atomically(source)
    seconds = time.monotonic() - started
    return (
        f"fetched {source.uri} into {source.folder} ({files} files, {size} bytes in "
        f"{seconds:.1f} s): {what}"
    )


def is_complete(folder: Path, source: Source) -> bool:
    """The folder holds a finished download of this source (its marker is written last).
    A full download also serves a tokenizer-only request."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    wanted = source.identity()
    same = all(marker.get(key) == wanted[key] for key in ("uri", "files"))
    return same and (not marker.get("tokenizerOnly") or source.tokenizer_only)


def wait_for_leader(source: Source, wait_seconds: float) -> None:
    """Poll for pod 0's marker on the shared volume."""
    deadline = time.monotonic() + wait_seconds
    while not is_complete(source.folder, source):
        if time.monotonic() >= deadline:
            raise InitError(
                "ModelFetchFailed",
                f"pod {source.index} waited {wait_seconds:g} s for pod 0 to fetch {source.uri} "
                f"into {source.folder}; it never finished (see pod 0's model-init log)",
            )
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def fetch_atomically(source: Source) -> tuple[int, int, str]:
    """Download into a temporary sibling, verify, mark, then rename into place. Returns the
    number of files, their bytes and what verification found."""
    folder = source.folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        details = fetch(source, partial)
        what = verify(source, partial)
        files = [p for p in partial.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        marker = {**source.identity(), **details, "bytes": size, "fetchedAt": time.time()}
        (partial / MARKER).write_text(json.dumps(marker, indent=1))
        replace_folder(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return len(files), size, what


def remove_leftovers(folder: Path) -> None:
    """Temporary folders an interrupted earlier attempt left next to `folder`."""
    for prefix in (f".{folder.name}.partial-", f".{folder.name}.stale-"):
        for leftover in folder.parent.glob(prefix + "*"):
            shutil.rmtree(leftover, ignore_errors=True)


def replace_folder(new: Path, folder: Path) -> None:
    """Rename `new` to `folder`, moving a stale or partial `folder` out of the way first
    (a directory cannot be renamed over a non-empty one)."""
    if folder.exists() or folder.is_symlink():
        stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
        os.replace(folder, stale / "old")
        os.replace(new, folder)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(new, folder)


def fetch(source: Source, into: Path) -> dict[str, Any]:
    """Download the source's files; what the marker should record besides the source."""
    try:
        if source.uri.startswith("s3://"):
            return fetch_s3(source.uri, into, source.tokenizer_only)
        if source.uri.startswith("https://"):
            return fetch_https(source.uri, source.files, into, source.tokenizer_only)
        if source.uri.startswith("hf://"):
            return fetch_hf(source.uri, into, source.tokenizer_only)
    except InitError:
        raise
    except Exception as error:  # storage, network and library errors alike
        raise InitError("ModelFetchFailed", f"{source.uri}: {describe(error)}") from error
    raise InitError("ModelNotFound", f"{source.uri}: not a model URI this initializer reads")


def describe(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"


def is_tokenizer_file(name: str) -> bool:
    """Top-level files a tokenizer-only consumer (a Dataset) needs."""
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in TOKENIZER_PATTERNS)


def safe_path(into: Path, name: str) -> Path:
    """`name` under `into`; a name that climbs out of it is refused."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise InitError("ModelFetchFailed", f"refusing file name {name!r}")
    target = into.joinpath(*relative.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


# -- s3:// --------------------------------------------------------------------------------------


def fetch_s3(uri: str, into: Path, tokenizer_only: bool) -> dict[str, Any]:
    """Every object under the prefix, keeping relative paths. boto3 reads AWS_ENDPOINT_URL and
    the AWS_* credentials from the environment."""
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    try:
        keys = list(s3_keys(client, bucket, prefix))
        if not keys:
            raise InitError("ModelNotFound", f"{uri}: no objects under the prefix")
        for key in keys:
            name = key[len(prefix) :]
            if tokenizer_only and not is_tokenizer_file(name):
                continue
            client.download_file(bucket, key, str(safe_path(into, name)))
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "NoSuchKey", "404"):
            raise InitError("ModelNotFound", f"{uri}: {describe(error)}") from error
        hint = " (check credentialsSecret)" if code in ("AccessDenied", "403") else ""
        raise InitError("ModelFetchFailed", f"{uri}: {describe(error)}{hint}") from error
    return {}


def s3_keys(client: Any, bucket: str, prefix: str) -> Iterable[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents") or []:
            if not str(item["Key"]).endswith("/"):  # folder placeholders
                yield str(item["Key"])


# -- https:// -----------------------------------------------------------------------------------


def fetch_https(
    base: str, files: Iterable[tuple[str, str]], into: Path, tokenizer_only: bool
) -> dict[str, Any]:
    """Each listed file from `base/name`, checked against its SHA-256."""
    for name, sha256 in files:
        if tokenizer_only and not is_tokenizer_file(name):
            continue
        download_checked(f"{base.rstrip('/')}/{name}", safe_path(into, name), name, sha256)
    return {}


def download_checked(url: str, target: Path, name: str, expected: str) -> None:
    """Stream `url` to `target`, hashing on the way (the file is read once)."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:
            while chunk := response.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as error:
        reason = "ModelNotFound" if error.code == 404 else "ModelFetchFailed"
        raise InitError(reason, f"{url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError) as error:
        raise InitError("ModelFetchFailed", f"{url}: {describe(error)}") from error
    if digest.hexdigest() != expected:
        raise InitError(
            "ChecksumMismatch",
            f"{name}: expected sha256 {expected}, got {digest.hexdigest()} (from {url})",
        )


# -- hf:// --------------------------------------------------------------------------------------


def parse_hf(uri: str) -> tuple[str, str | None]:
    repo, _, revision = uri.removeprefix("hf://").partition("@")
    return repo, revision or None


def hf_patterns(
    names: Iterable[str], tokenizer_only: bool
) -> tuple[list[str] | None, list[str] | None]:
    """allow_patterns and ignore_patterns for snapshot_download: the tokenizer files only, or
    everything but the duplicate weight formats of a repository that has safetensors."""
    if tokenizer_only:
        return list(TOKENIZER_PATTERNS), None
    if any(n.endswith(".safetensors") for n in names):
        return None, list(OTHER_WEIGHT_PATTERNS)
    return None, None


def fetch_hf(uri: str, into: Path, tokenizer_only: bool) -> dict[str, Any]:
    """`snapshot_download` of the repository at one commit (HF_ENDPOINT: a mirror, HF_TOKEN:
    a gated or private model)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()  # a pod log is not a terminal
    repo, revision = parse_hf(uri)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    where = f"{repo} at {endpoint or 'the Hugging Face Hub'}"
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        allow, ignore = hf_patterns(names, tokenizer_only)
        # The commit the listing came from: files of one revision, even if a branch moves.
        snapshot_download(
            repo,
            revision=info.sha,
            local_dir=into,
            cache_dir=into / ".cache" / "hub",
            endpoint=endpoint,
            token=token,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except GatedRepoError as error:
        raise InitError("ModelFetchFailed", f"{where} is gated: {TOKEN_HINT}") from error
    except RevisionNotFoundError as error:
        raise InitError("ModelNotFound", f"{where}: no revision {revision!r}") from error
    except RepositoryNotFoundError as error:
        # The Hub answers the same for a private repository without a valid token.
        hint = "" if token else f" (if it is private, {TOKEN_HINT})"
        raise InitError("ModelNotFound", f"no repository {where}{hint}") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        hint = f": {TOKEN_HINT}" if status in (401, 403) else ""
        raise InitError("ModelFetchFailed", f"{where}: {describe(error)}{hint}") from error
    # snapshot_download's own bookkeeping; the marker is ours.
    shutil.rmtree(into / ".cache", ignore_errors=True)
    return {"revision": revision, "commit": info.sha}


# -- verification -------------------------------------------------------------------------------


def verify(source: Source, folder: Path | None = None) -> str:
    """Check that the folder is a loadable Hugging Face model; what it found."""
    folder = folder or source.folder
    if source.any_model:
        count = sum(1 for path in folder.rglob("*") if path.is_file())
        if not count:
            raise InitError("ModelNotFound", f"{source.uri}: no files")
        return f"{count} files"
    config = read_config(folder)
    tokenizer = check_tokenizer(folder)
    weights = "tokenizer only" if source.tokenizer_only else check_weights(folder)
    # Last: it imports transformers (and torch), seconds that a missing file need not cost.
    return f"{check_architecture(config)}, {tokenizer}, {weights}"


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InitError("MissingModelConfig", f"no config.json in {folder}")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise InitError("MissingModelConfig", f"{path} is not JSON: {error}") from error
    if not isinstance(config, dict):
        raise InitError("MissingModelConfig", f"{path} is not a JSON object")
    return config


def check_architecture(config: Mapping[str, Any]) -> str:
    """transformers knows the model_type (AutoConfig) and every class in architectures."""
    import transformers

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not knows_model_type(model_type):
        raise InitError(
            "UnknownArchitecture",
            f"config.json model_type {model_type!r} is not known to transformers "
            f"{transformers.__version__}",
        )
    architectures = [str(a) for a in config.get("architectures") or []]
    known = set(dir(transformers))  # the lazy module lists its classes without importing them
    for name in architectures:
        if name not in known:
            raise InitError(
                "UnknownArchitecture",
                f"config.json architecture {name} is not in transformers "
                f"{transformers.__version__} (model_type {model_type!r})",
            )
    return f"{'/'.join(architectures) or 'no architectures'} ({model_type})"


def knows_model_type(model_type: str) -> bool:
    """Whether AutoConfig has a config class for `model_type`. The generated table it starts
    from answers the common case without importing torch (seconds in every pod); anything
    else is looked up in AutoConfig's own mapping."""
    try:
        from transformers.models.auto.auto_mappings import CONFIG_MAPPING_NAMES

        if model_type in CONFIG_MAPPING_NAMES:
            return True
    except ImportError:  # another transformers layout: the mapping below decides
        pass
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def top_level(folder: Path, patterns: Iterable[str]) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]


def check_tokenizer(folder: Path) -> str:
    if (folder / "tokenizer.json").is_file():
        return "tokenizer.json"
    if (folder / "tokenizer_config.json").is_file():
        vocab = top_level(folder, VOCAB_PATTERNS)
        if vocab:
            return f"tokenizer_config.json with {', '.join(vocab)}"
        raise InitError(
            "MissingTokenizer",
            f"tokenizer_config.json in {folder} but no vocabulary (vocab.*, merges.txt, *.model)",
        )
    raise InitError("MissingTokenizer", f"no tokenizer.json or tokenizer_config.json in {folder}")


def check_weights(folder: Path) -> str:
    """Weights are present; a sharded checkpoint has every shard its index names."""
    for index in WEIGHT_INDEXES:
        path = folder / index
        if path.is_file():
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as error:
                raise InitError("MissingWeights", f"{path} has no weight_map") from error
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise InitError("MissingWeights", f"{index} names missing shards: {missing[:3]}")
            return f"{len(shards)} weight shards"
    weights = top_level(folder, ("*.safetensors", "pytorch_model*.bin"))
    if not weights:
        raise InitError(
            "MissingWeights", f"no *.safetensors or pytorch_model*.bin weights in {folder}"
        )
    return ", ".join(weights)


# -- the command --------------------------------------------------------------------------------


def fail(error: InitError) -> int:
    """The termination message the operator reads, and the same line in the log."""
    message = " ".join(error.message.split())[:MESSAGE_LIMIT]
    with contextlib.suppress(OSError):
        write_failure(MODEL_INIT_STAGE, error.reason, message)
    print(f"model-init failed: {error.reason}: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops_trainer.model_init")
    parser.add_argument(
        "--tokenizer-only", action="store_true", help="fetch and verify the tokenizer only"
    )
    parser.add_argument(
        "--any-model",
        action="store_true",
        help="the folder may be any model the server loads (an llmops checkpoint or export): "
        "fetch it without the Hugging Face format checks",
    )
    parser.add_argument(
        "--wait-seconds",
        type=float,
        default=DEFAULT_WAIT_SECONDS,
        help="how long a gang pod other than 0 waits for pod 0's download",
    )
    args = parser.parse_args(argv)
    try:
        source = Source.from_env(
            os.environ, tokenizer_only=args.tokenizer_only, any_model=args.any_model
        )
        print(f"model-init: {initialize(source, args.wait_seconds)}", flush=True)
    except InitError as error:
        return fail(error)
    except Exception as error:  # a bug or an unforeseen error: still a reason for the status
        traceback.print_exc()
        return fail(InitError("ModelFetchFailed", describe(error)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
