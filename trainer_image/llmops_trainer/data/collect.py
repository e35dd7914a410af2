"""Collect: list a Dataset's inputs, stream their bytes and parse them into documents.

Inputs are listed in one deterministic order (sources in spec order, files sorted), so every
slice of an Indexed Job agrees on which pieces of them are its own without talking to the
others (data.pieces cuts big inputs into pieces and assigns them). Compression is recognised
by magic bytes, not by file name.

An input's identity (in the fingerprint and a slice's stats.json) is its *block digest*: the
sha256 of the concatenated sha256 digests of its 1 MiB blocks (`DIGEST_BLOCK`), so that
slices reading different pieces of one file can each hash their blocks and the prepare stage joins
them, whatever the pieces (`input_digest` computes it for a local file).
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from llmops.api.dataset import DatasetSpec, DataSource
from llmops.api.workload import Env
from llmops_trainer.data import hub
from llmops_trainer.data.chat import Message, parse_messages

# Where the controller mounts each `volume` source's claim: <root>/<claimName>.
VOLUMES_DIR_ENV = Env.VOLUMES_DIR
DEFAULT_VOLUMES_DIR = "/mnt/llmops/volumes"
HTTP_ATTEMPTS = 5
CHUNK = 1 << 20
DIGEST_BLOCK = 1 << 20  # the unit of an input's block digest
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
    size: int | None = None  # bytes, when the listing tells (files, S3 objects)


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
            inputs += [InputRef(index, "s3", key, size) for key, size in _s3_keys(source)]
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


def _local(index: int, source: DataSource, root: Path) -> list[InputRef]:
    if root.is_file():
        return [InputRef(index, "file", str(root), root.stat().st_size)]
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
    return [InputRef(index, "file", str(p), p.stat().st_size) for p in files]


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


def _s3_keys(source: DataSource) -> list[tuple[str, int]]:
    assert source.s3 is not None
    client = _s3_client(source)
    keys: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=source.s3.bucket, Prefix=source.s3.prefix
    ):
        keys += [
            (obj["Key"], int(obj["Size"]))
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
    """Passes the bytes of an input read from `offset` on through, hashing its
    `DIGEST_BLOCK` blocks that start in [low, high) (high None: to the end; low a multiple
    of the block): the part of the input's block digest this reader owns."""

    def __init__(
        self, raw: IO[bytes], offset: int = 0, low: int = 0, high: int | None = None
    ) -> None:
        assert low % DIGEST_BLOCK == 0 and offset <= low
        self.raw, self.offset, self.low, self.high = raw, offset, low, high
        self.start = offset
        self.blocks: list[bytes] = []  # sha256 digests of the finished blocks
        self._block = hashlib.sha256()
        self._filled = 0

    @property
    def size(self) -> int:
        """Bytes read so far."""
        return self.offset - self.start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._feed(data)
        return n

    def _feed(self, data: bytes) -> None:
        pos, view = self.offset, memoryview(data)
        i = max(self.low - pos, 0)
        end = len(data) if self.high is None else min(len(data), self.high - pos)
        while i < end:
            at = pos + i
            take = min(end - i, DIGEST_BLOCK - at % DIGEST_BLOCK)
            self._block.update(view[i : i + take])
            self._filled += take
            i += take
            if (at + take) % DIGEST_BLOCK == 0:
                self._close_block()
        self.offset += len(data)

    def _close_block(self) -> None:
        self.blocks.append(self._block.digest())
        self._block = hashlib.sha256()
        self._filled = 0

    def finish(self) -> list[bytes]:
        """Reads on to the end of the window (or of the input); the window's block digests."""
        while self.high is None or self.offset < self.high:
            want = CHUNK if self.high is None else min(CHUNK, self.high - self.offset)
            data = self.raw.read(want)
            if not data:
                break
            self._feed(data)
        if self._filled:
            self._close_block()
        return self.blocks

    def digest(self) -> str:
        """The block digest of a whole input read from its start (after `finish`)."""
        return blocks_digest(self.blocks)


def blocks_digest(blocks: list[bytes]) -> str:
    """An input's identity from the digests of all its blocks, in order."""
    return hashlib.sha256(b"".join(blocks)).hexdigest()


def input_digest(path: Path) -> str:
    """The block digest of a local file, as a slice's stats.json and the fingerprint use it."""
    with open(path, "rb") as raw:
        hashing = _Hashing(raw)
        hashing.finish()
    return hashing.digest()


class _HttpStream(io.RawIOBase):
    """An HTTP(S) body that reconnects with a Range request where a transfer broke off,
    and checks length and (when the URL names one: `#sha256=<hex>`) the checksum at the end."""

    def __init__(self, url: str, offset: int = 0) -> None:
        """`offset`: start there (a Range request); the checksum is then not checked."""
        self.url, _, fragment = url.partition("#")
        named = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
        self.expected = named if offset == 0 else None
        self.digest = hashlib.sha256()
        self.offset = offset
        self.length: int | None = None
        self.response: Any = None
        self._connect()

    def _connect(self) -> None:
        def connect() -> None:
            request = urllib.request.Request(self.url)
            if self.offset:
                request.add_header("Range", f"bytes={self.offset}-")
            self.response = urllib.request.urlopen(request, timeout=60)
            if self.offset and self.response.status != 206:
                raise OSError("server ignored the Range request")
            if self.length is None and self.response.headers.get("Content-Length"):
                self.length = self.offset + int(self.response.headers["Content-Length"])

        with_retries(self.url, connect)

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


def open_raw(spec: DatasetSpec, ref: InputRef, offset: int = 0) -> IO[bytes]:
    """The raw bytes of an input from `offset` on (a ranged read; hf inputs: from 0 only)."""
    source = spec.sources[ref.source]
    if ref.kind == "file":
        raw = open(ref.location, "rb")  # noqa: SIM115 - the caller closes it
        raw.seek(offset)
        return raw
    if ref.kind == "url":
        return _HttpStream(ref.location, offset)  # type: ignore[return-value]
    if ref.kind == "hf":
        if offset:
            raise ValueError("Hub inputs are read whole")
        return hub.open_file(source, ref.location)
    assert source.s3 is not None
    extra = {"Range": f"bytes={offset}-"} if offset else {}
    client = _s3_client(source)
    body: IO[bytes] = client.get_object(Bucket=source.s3.bucket, Key=ref.location, **extra)["Body"]
    return body


def read_range(spec: DatasetSpec, ref: InputRef, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file, an S3 object or a URL whose server honours Range."""
    source = spec.sources[ref.source]
    if end <= start:
        return b""
    if ref.kind == "file":
        with open(ref.location, "rb") as raw:
            raw.seek(start)
            return raw.read(end - start)
    if ref.kind == "s3":
        assert source.s3 is not None
        client = _s3_client(source)
        got = client.get_object(
            Bucket=source.s3.bucket, Key=ref.location, Range=f"bytes={start}-{end - 1}"
        )
        return bytes(got["Body"].read())
    if ref.kind == "url":
        return _http_range(ref.location.split("#", 1)[0], start, end)[0]
    raise ValueError(f"{ref.kind} inputs are read whole")


def _http_range(url: str, start: int, end: int) -> tuple[bytes, int | None]:
    """Bytes [start, end) of a URL and its total size; (b"", None) when the server answers
    the Range request with the whole body (or an empty file's 416)."""

    def fetch() -> tuple[bytes, int | None]:
        request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end - 1}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status != 206:
                    return b"", None
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                return response.read(), int(total) if total.isdigit() else None
        except urllib.error.HTTPError as error:
            if error.code == 416:
                return b"", None
            raise

    return with_retries(url, fetch)


T = TypeVar("T")


def backoff(tries: int, error: Exception) -> float:
    """Seconds before the next attempt of a download: 0.2 s doubling, at most 10."""
    return min(2.0**tries * 0.2, 10.0)


def with_retries(
    url: str,
    attempt: Callable[[], T],
    *,
    attempts: int = HTTP_ATTEMPTS,
    delay: Callable[[int, Exception], float] = backoff,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`attempt()`, retried up to `attempts` times in all with `delay(tries, error)` seconds
    between attempts on 5xx, 429 and connection errors; other HTTP errors (a 404, a 403) are
    answers, raised at once. When every attempt failed, an OSError caused by the last error."""
    last: Exception | None = None
    for tries in range(attempts):
        try:
            return attempt()
        except urllib.error.HTTPError as error:
            if error.code < 500 and error.code != 429:
                raise
            last = error
        except OSError as error:
            last = error
        if tries + 1 < attempts:
            sleep(delay(tries, last))
    raise OSError(f"{url}: giving up after {attempts} attempts: {last}") from last


def probe_url(url: str) -> tuple[int | None, bytes]:
    """(size, first bytes) of a URL whose server honours Range; (None, b"") otherwise."""
    head, size = _http_range(url.split("#", 1)[0], 0, 6)
    return (size, head) if size is not None else (None, b"")


@contextmanager
def open_input(spec: DatasetSpec, ref: InputRef) -> Iterator[tuple[IO[bytes], _Hashing]]:
    """The decompressed byte stream of a whole input, and the hasher of its raw bytes
    (`finish()` it to hash what the reader left)."""
    raw = open_raw(spec, ref)
    hashing = _Hashing(raw)
    try:
        yield _decompress(hashing), hashing  # type: ignore[arg-type]
    finally:
        raw.close()


def is_compressed(magic: bytes) -> bool:
    """Whether the first bytes of an input are those of a compressed stream."""
    return magic.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zXZ\x00"))


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
        yield from parquet_rows(table, source, None)


def parquet_rows(
    table: Any, source: DataSource, row_groups: list[int] | None
) -> Iterator[Document]:
    """The documents of a `pyarrow.parquet.ParquetFile` (of some of its row groups)."""
    if source.messages_field is not None:
        columns = [source.messages_field]
    elif source.prompt_field is not None and source.response_field is not None:
        columns = [source.prompt_field, source.response_field]
    else:
        columns = [source.text_field]
    for batch in table.iter_batches(batch_size=4096, columns=columns, row_groups=row_groups):
        for record in batch.to_pylist():
            yield _make(record, source)
