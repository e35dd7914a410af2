from __future__ import annotations

import bz2
import gzip
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from llmops.api.dataset import DatasetSpec, DataSource
from llmops_trainer.data.collect import (
    ChecksumError,
    expand_path,
    glob_match,
    input_digest,
    list_inputs,
    open_input,
    read_documents,
)
from llmops_trainer.data.pieces import make_plan


def _spec(**source: Any) -> DatasetSpec:
    return DatasetSpec.model_validate(
        {"sources": [{"name": "s", **source}], "tokenizer": {"train": {}}}
    )


def _read(spec: DatasetSpec) -> list[tuple[str, str | None]]:
    out = []
    for ref in list_inputs(spec):
        with open_input(spec, ref) as (stream, _):
            out += [(d.text, d.response) for d in read_documents(stream, spec.sources[ref.source])]
    return out


@pytest.mark.parametrize(
    ("separator", "expected"),
    [
        ("blank-line", ["a b\nc\n", "d\n"]),
        ("line", ["a b", "c", "d"]),
        ("file", ["a b\nc\n\n\nd\n"]),
    ],
)
def test_text_separators(tmp_path: Path, separator: str, expected: list[str]) -> None:
    (tmp_path / "x.txt").write_text("a b\nc\n\n\nd\n")
    spec = _spec(path=str(tmp_path / "x.txt"), documentSeparator=separator)
    assert [t for t, _ in _read(spec)] == expected


@pytest.mark.parametrize("codec", ["gzip", "zstd", "bz2", "plain"])
def test_compression_by_magic_bytes(tmp_path: Path, codec: str) -> None:
    data = b'{"text": "one"}\n{"text": "two"}\nnot json\n{"other": 1}\n'
    packed = {
        "gzip": gzip.compress,
        "zstd": zstandard.ZstdCompressor().compress,
        "bz2": bz2.compress,
        "plain": bytes,
    }[codec](data)
    (tmp_path / "data.bin").write_bytes(packed)
    assert _read(_spec(path=str(tmp_path), format="jsonl")) == [("one", None), ("two", None)]


def test_supervised_pairs_and_nested_fields(tmp_path: Path) -> None:
    rows = [{"q": {"text": "2+2?"}, "a": "4"}, {"q": {"text": "sky?"}, "a": "blue"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(path=str(tmp_path), format="jsonl", promptField="q.text", responseField="a")
    assert _read(spec) == [("2+2?", "4"), ("sky?", "blue")]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first", "second"]}), tmp_path / "t.parquet")
    spec = _spec(path=str(tmp_path), format="parquet", textField="body")
    assert [t for t, _ in _read(spec)] == ["first", "second"]


def test_listing_is_sorted_and_slices_partition(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt", ".hidden"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    refs = list_inputs(_spec(path=str(tmp_path)))
    assert [Path(r.location).name for r in refs] == ["a.txt", "b.txt", "c.txt"]
    plan = make_plan(_spec(path=str(tmp_path)), refs, 2, 1 << 20)
    parts = [[p.input for p in plan.of(i)] for i in range(2)]
    assert sorted(parts[0] + parts[1]) == [0, 1, 2] and all(parts)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    handler = type(
        "Quiet",
        (http.server.SimpleHTTPRequestHandler,),
        {"log_message": lambda *a: None},
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


def test_http_streamed_and_checksummed(http_root: tuple[str, Path]) -> None:
    base, root = http_root
    data = gzip.compress(b"alpha\n\nbeta\n")
    (root / "c.txt.gz").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    spec = _spec(urls=[f"{base}/c.txt.gz#sha256={digest}"])
    assert [t for t, _ in _read(spec)] == ["alpha\n", "beta\n"]
    ref = list_inputs(spec)[0]
    with open_input(spec, ref) as (stream, hashing):
        stream.read()
        hashing.finish()
    assert hashing.digest() == input_digest(root / "c.txt.gz")
    bad = _spec(urls=[f"{base}/c.txt.gz#sha256={'0' * 64}"])
    with pytest.raises(ChecksumError):
        _read(bad)


def test_http_missing_file_fails(http_root: tuple[str, Path]) -> None:
    base, _ = http_root
    with pytest.raises(OSError):
        _read(_spec(urls=[f"{base}/nope.txt"]))


def test_s3_with_local_server(monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="corpus")
        client.put_object(Bucket="corpus", Key="en/b.jsonl", Body=b'{"text": "bee"}\n')
        client.put_object(
            Bucket="corpus",
            Key="en/a.jsonl.zst",
            Body=zstandard.ZstdCompressor().compress(b'{"text": "ant"}\n'),
        )
        client.put_object(Bucket="corpus", Key="fr/c.jsonl", Body=b'{"text": "chat"}\n')
        spec = _spec(s3={"bucket": "corpus", "prefix": "en/", "endpoint": endpoint}, format="jsonl")
        assert _read(spec) == [("ant", None), ("bee", None)]
    finally:
        server.stop()


def test_source_model_roundtrip() -> None:
    source = DataSource(name="x", path="/data")
    assert source.format == "text"


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.py", "os.py", True),
        ("*.py", "email/parser.py", False),  # `*` stays inside a folder
        ("**/*.py", "email/mime/text.py", True),
        ("**/*.py", "os.py", True),  # `**` also spans no folder
        ("test/**", "test/support/x.py", True),
        ("test/**", "tests/x.py", False),
        ("[ab]*.txt", "b1.txt", True),
        ("?.txt", "ab.txt", False),
    ],
)
def test_glob_patterns(pattern: str, path: str, matches: bool) -> None:
    assert glob_match(pattern, path) is matches


def test_include_and_exclude_select_files_of_a_folder(tmp_path: Path) -> None:
    for name in ("a.py", "b.txt", "pkg/c.py", "pkg/tests/d.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    spec = _spec(path=str(tmp_path), include=["**/*.py"], exclude=["**/tests/**"])
    assert [Path(i.location).relative_to(tmp_path).as_posix() for i in list_inputs(spec)] == [
        "a.py",
        "pkg/c.py",
    ]
    with pytest.raises(FileNotFoundError, match=r"source s: no file under .* is selected"):
        list_inputs(_spec(path=str(tmp_path), include=["*.md"]))


def test_paths_expand_variables_as_kubernetes_does(tmp_path: Path) -> None:
    assert expand_path("$(DATA)/x", {"DATA": "/d"}) == "/d/x"
    assert expand_path("$$(DATA)", {"DATA": "/d"}) == "$(DATA)"
    stdlib = Path(expand_path("$(PYTHON_STDLIB)", {}))
    assert (stdlib / "os.py").is_file()  # this interpreter's standard library
    with pytest.raises(ValueError, match=r"names \$\(MISSING\), which is not set"):
        expand_path("$(MISSING)/x", {})


def test_include_is_refused_for_urls() -> None:
    with pytest.raises(ValueError, match="include and exclude select files"):
        _spec(urls=["https://example.org/a.txt"], include=["*.txt"])
