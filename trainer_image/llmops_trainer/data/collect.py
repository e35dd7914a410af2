"""Collect: list a Dataset's inputs, stream their bytes and parse them into documents.

Inputs are listed in one deterministic order (sources in spec order, files sorted), so every
slice of an Indexed Job agrees on which inputs are its own without talking to the others.
Compression is recognised by magic bytes, not by file name.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from llmops.api.dataset import DatasetSpec, DataSource
from llmops.api.workload import Env
from llmops_trainer.data import hub
from llmops_trainer.data.chat import Message, parse_messages

# Where the controller mounts each `volume` source's claim: <root>/<claimName>.
VOLUMES_DIR_ENV = Env.VOLUMES_DIR
DEFAULT_VOLUMES_DIR = "/mnt/llmops/volumes"
HTTP_ATTEMPTS = 5
CHUNK = 1 << 20
# `$(VAR)` as Kubernetes expands it in args; `$$` is a literal `$`.
_VARIABLE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Why a record yields no document (drop reasons of the normalize step).
UNREADABLE = "unreadable"  # not JSON, or without the source's fields as strings
MALFORMED_CHAT = "malformed-chat"  # messagesField is not a list of {role, content} messages


class ChecksumError(RuntimeError):
    """A downloaded input does not match the checksum its URL names."""


@dataclass(frozen=True)
class Document:
    """One document; supervised pairs keep prompt (`text`) and `response` apart, a chat
    keeps its messages (and `text` is empty). A record that could not be read is a document
    with the reason in `unreadable`, so that it is counted."""

    text: str
    response: str | None = None
    messages: list[Message] | None = None
    unreadable: str | None = None


@dataclass(frozen=True)
class InputRef:
    """One file-like input: a local file, a URL, an object in a bucket or a file of a Hub
    dataset repository (`hf://datasets/<repo>@<commit>/<path>`)."""

    source: int  # index into spec.sources
    kind: Literal["file", "url", "s3", "hf"]
    location: str


def list_inputs(
    spec: DatasetSpec, volumes_dir: Path | None = None, work_dir: Path | None = None
) -> list[InputRef]:
    """`work_dir`: the slices' shared work folder, where a Hub revision is pinned to one
    commit (default: LLMOPS_WORK_DIR, else <LLMOPS_OUTPUT_DIR>/.work, else not pinned)."""
    volumes = volumes_dir or Path(os.environ.get(VOLUMES_DIR_ENV, DEFAULT_VOLUMES_DIR))
    inputs: list[InputRef] = []
    for index, source in enumerate(spec.sources):
        if source.path is not None:
            inputs += _local(index, source, Path(expand_path(source.path)))
        elif source.volume is not None:
            root = volumes / source.volume.claim_name / source.volume.path
            inputs += _local(index, source, root)
        elif source.urls is not None:
            inputs += [InputRef(index, "url", url) for url in source.urls]
        elif source.s3 is not None:
            inputs += [InputRef(index, "s3", key) for key in _s3_keys(source)]
        elif source.hf is not None:
            pins = work_dir or _work_dir()
            inputs += [InputRef(index, "hf", f) for f in _hub_files(source, pins)]
    return inputs


def _work_dir() -> Path | None:
    if os.environ.get(Env.WORK_DIR):
        return Path(os.environ[Env.WORK_DIR])
    output = os.environ.get(Env.OUTPUT_DIR)
    return Path(output) / ".work" if output else None


def expand_path(path: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace `$(VAR)` with the environment's VAR; `PYTHON_STDLIB` defaults to this
    interpreter's standard library folder (text every machine with Python has)."""
    given = os.environ if environ is None else environ
    env = {"PYTHON_STDLIB": sysconfig.get_paths()["stdlib"], **given}

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        if name not in env:
            raise ValueError(f"source path {path!r} names $({name}), which is not set")
        return env[name]

    return _VARIABLE.sub(value, path)


def selected(relative: str, source: DataSource) -> bool:
    """Whether a file, by its path relative to the source's folder or prefix, is kept."""
    if source.include and not any(glob_match(p, relative) for p in source.include):
        return False
    return not any(glob_match(p, relative) for p in source.exclude)


def glob_match(pattern: str, path: str) -> bool:
    """Match a "/"-separated path: `*`, `?` and `[...]` stay inside one segment, a `**`
    segment spans any number of them (as in .gitignore and fsspec globs)."""
    return _match_segments(pattern.strip("/").split("/"), path.strip("/").split("/"))


def _match_segments(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_match_segments(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return (
        bool(path)
        and fnmatch.fnmatchcase(path[0], pattern[0])
        and _match_segments(pattern[1:], path[1:])
    )


def slice_inputs(inputs: list[InputRef], index: int, count: int) -> list[int]:
    """Input indices owned by slice `index` of `count` (round-robin keeps slices even)."""
    return list(range(index, len(inputs), count))


def _local(index: int, source: DataSource, root: Path) -> list[InputRef]:
    if root.is_file():
        return [InputRef(index, "file", str(root))]
    if not root.is_dir():
        raise FileNotFoundError(f"source path {root} does not exist")
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and selected(p.relative_to(root).as_posix(), source)
    )
    if not files and (source.include or source.exclude):
        raise FileNotFoundError(f"source {source.name}: no file under {root} is selected")
    return [InputRef(index, "file", str(p)) for p in files]


def _s3_client(source: DataSource) -> Any:
    import boto3
    from botocore.config import Config

    assert source.s3 is not None
    # Credentials come from the standard AWS variables (the controller maps the Secret).
    return boto3.client(
        "s3",
        endpoint_url=source.s3.endpoint,
        region_name=source.s3.region or os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(retries={"max_attempts": HTTP_ATTEMPTS, "mode": "standard"}),
    )


def _s3_keys(source: DataSource) -> list[str]:
    assert source.s3 is not None
    client = _s3_client(source)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=source.s3.bucket, Prefix=source.s3.prefix
    ):
        keys += [
            obj["Key"]
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
            and selected(obj["Key"][len(source.s3.prefix) :].lstrip("/"), source)
        ]
    return sorted(keys)


def _hub_files(source: DataSource, pin_dir: Path | None) -> list[str]:
    """The selected files of a Hub dataset repository at its pinned commit; what is not data
    (README.md, .gitattributes, ...) only when an include pattern names it."""
    assert source.hf is not None
    sha = hub.commit(source, pin_dir)
    names = sorted(
        name
        for name in hub.files(source, sha)
        if selected(name, source) and (bool(source.include) or not hub.not_data(name))
    )
    if not names:
        raise FileNotFoundError(
            f"source {source.name}: no data file selected in Hub dataset {source.hf.repo} "
            f"at commit {sha}"
        )
    return [hub.location(source.hf, sha, name) for name in names]


class _Hashing(io.RawIOBase):
    """Passes bytes through, hashing them (the input's identity in the fingerprint)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.size += n
        return n


class _HttpStream(io.RawIOBase):
    """An HTTP(S) body that reconnects with a Range request where a transfer broke off,
    and checks length and (when the URL names one: `#sha256=<hex>`) the checksum at the end."""

    def __init__(self, url: str) -> None:
        self.url, _, fragment = url.partition("#")
        self.expected = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
        self.digest = hashlib.sha256()
        self.offset = 0
        self.length: int | None = None
        self.response: Any = None
        self._connect()

    def _connect(self) -> None:
        for attempt in range(HTTP_ATTEMPTS):
            try:
                request = urllib.request.Request(self.url)
                if self.offset:
                    request.add_header("Range", f"bytes={self.offset}-")
                self.response = urllib.request.urlopen(request, timeout=60)
                if self.offset and self.response.status != 206:
                    raise OSError("server ignored the Range request")
                if self.length is None and self.response.headers.get("Content-Length"):
                    self.length = int(self.response.headers["Content-Length"])
                return
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code != 429:
                    raise
                last: Exception = error
            except OSError as error:
                last = error
            time.sleep(min(2**attempt * 0.2, 10))
        raise OSError(f"{self.url}: giving up after {HTTP_ATTEMPTS} attempts: {last}")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        for _ in range(HTTP_ATTEMPTS):
            try:
                data = self.response.read(len(buffer))
                break
            except OSError:
                self._connect()
        else:
            raise OSError(f"{self.url}: transfer kept failing at byte {self.offset}")
        if not data:
            self._finish()
            return 0
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.offset += n
        return n

    def _finish(self) -> None:
        if self.length is not None and self.offset != self.length:
            raise OSError(f"{self.url}: got {self.offset} of {self.length} bytes")
        if self.expected and self.digest.hexdigest() != self.expected.lower():
            raise ChecksumError(f"{self.url}: sha256 {self.digest.hexdigest()} != {self.expected}")

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
        super().close()


def _decompress(raw: IO[bytes]) -> IO[bytes]:
    buffered = io.BufferedReader(raw, CHUNK)  # type: ignore[type-var]
    magic = buffered.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered)
    if magic[:3] == b"BZh":
        return bz2.BZ2File(buffered)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered)
    return buffered


@contextmanager
def open_input(spec: DatasetSpec, ref: InputRef) -> Iterator[tuple[IO[bytes], _Hashing]]:
    """The decompressed byte stream of an input, and the hasher of its raw bytes."""
    source = spec.sources[ref.source]
    raw: IO[bytes]
    if ref.kind == "file":
        raw = open(ref.location, "rb")  # noqa: SIM115 - closed below
    elif ref.kind == "url":
        raw = _HttpStream(ref.location)  # type: ignore[assignment]
    elif ref.kind == "hf":
        raw = hub.open_file(source, ref.location)
    else:
        assert source.s3 is not None
        body = _s3_client(source).get_object(Bucket=source.s3.bucket, Key=ref.location)["Body"]
        raw = body
    hashing = _Hashing(raw)
    try:
        yield _decompress(hashing), hashing  # type: ignore[arg-type]
    finally:
        raw.close()


def read_documents(
    stream: IO[bytes], source: DataSource, *, unreadable: bool = False
) -> Iterator[Document]:
    """The documents of one input. `unreadable`: also yield a document (with the reason
    set) for every record that is not one, so that the caller can count it."""
    if source.format == "parquet":
        documents = _parquet(stream, source)
    elif source.format == "jsonl":
        documents = _jsonl(
            io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=None), source
        )
    else:
        yield from _text(stream, source)
        return
    for document in documents:
        if unreadable or document.unreadable is None:
            yield document


def _text(stream: IO[bytes], source: DataSource) -> Iterator[Document]:
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=None)
    if source.document_separator == "file":
        yield Document(text.read())
    elif source.document_separator == "line":
        for line in text:
            if line.strip():
                yield Document(line.rstrip("\n"))
    else:
        paragraph: list[str] = []
        for line in text:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield Document("".join(paragraph))
                paragraph = []
        if paragraph:
            yield Document("".join(paragraph))


def _field(record: Any, name: str) -> Any:
    """`a.b` reaches into nested objects when no flat key of that name exists."""
    if isinstance(record, dict) and name in record:
        return record[name]
    for part in name.split("."):
        if not isinstance(record, dict):
            return None
        record = record.get(part)
    return record


def _make(record: Any, source: DataSource) -> Document:
    if source.messages_field is not None:
        messages = parse_messages(_field(record, source.messages_field))
        if messages is None:
            return Document("", unreadable=MALFORMED_CHAT)
        return Document("", messages=messages)
    if source.prompt_field is not None and source.response_field is not None:
        prompt, response = (
            _field(record, source.prompt_field),
            _field(record, source.response_field),
        )
        if isinstance(prompt, str) and isinstance(response, str):
            return Document(prompt, response)
        return Document("", unreadable=UNREADABLE)
    text = _field(record, source.text_field)
    return Document(text) if isinstance(text, str) else Document("", unreadable=UNREADABLE)


def _jsonl(lines: IO[str], source: DataSource) -> Iterator[Document]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A torn line is dropped and counted, not fatal.
            yield Document("", unreadable=UNREADABLE)
            continue
        yield _make(record, source)


def _parquet(stream: IO[bytes], source: DataSource) -> Iterator[Document]:
    import pyarrow.parquet as pq

    # Parquet needs random access: spool non-seekable streams to a temporary file.
    with tempfile.TemporaryFile() as spool:
        while block := stream.read(CHUNK):
            spool.write(block)
        spool.seek(0)
        table = pq.ParquetFile(spool)
        if source.messages_field is not None:
            columns = [source.messages_field]
        elif source.prompt_field is not None and source.response_field is not None:
            columns = [source.prompt_field, source.response_field]
        else:
            columns = [source.text_field]
        for batch in table.iter_batches(batch_size=4096, columns=columns):
            for record in batch.to_pylist():
                yield _make(record, source)
