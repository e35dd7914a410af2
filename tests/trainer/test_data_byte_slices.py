"""Inputs cut into byte-range pieces (and parquet row groups) spread over slices, and the
output does not care: shards, manifest, card and decisions are the same for any number of
slices and pieces."""

from __future__ import annotations

import email.utils
import http.server
import io
import json
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmops.api.dataset import Dataset
from llmops_trainer.data import Options, run_local
from llmops_trainer.data.collect import blocks_digest, input_digest, list_inputs
from llmops_trainer.data.pieces import make_plan, piece_bytes, read_piece
from llmops_trainer.data.pipeline import decisions as joined_decisions
from llmops_trainer.shards import MANIFEST, verify

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from data_corpus import document, near_copy

KIB = 1024


def _dataset(source: dict[str, Any]) -> Dataset:
    return Dataset.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "cut"},
            "spec": {
                "sources": [{"name": "s", **source}],
                "tokenizer": {"train": {"vocabSize": 400}},
                "split": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 5},
                "sharding": {"tokensPerShard": 4096},
            },
        }
    )


def _texts(count: int = 160) -> list[str]:
    rng = random.Random(7)
    docs = [document(rng, rng.randint(8, 40)) for _ in range(count)]
    docs += [docs[3], docs[10], near_copy(docs[20], rng, 1), "Too short."]
    rng.shuffle(docs)
    return docs


def _jsonl(path: Path) -> Path:
    """Records of 50 to 300 bytes, some CRLF-terminated, a blank line, a torn record and a
    last line without a newline: many lines straddle 1 KiB piece boundaries."""
    lines = [json.dumps({"text": t}) for t in _texts()]
    body = b""
    for number, line in enumerate(lines[:-1]):
        body += line.encode() + (b"\r\n" if number % 3 == 0 else b"\n")
        if number == 40:
            body += b"\n{not json\n"
    path.write_bytes(body + lines[-1].encode())
    return path


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every output file; the manifest without its timings."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and ".work" not in path.parts:
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    manifest = json.loads(files.pop(MANIFEST))
    manifest["stats"].pop("seconds")
    files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()
    count = len(list((folder / ".work").glob("slice-*")))
    decisions = joined_decisions(folder / ".work", count)
    for name in ("inputs", "positions"):
        files[f"decisions/{name}"] = decisions[name].tobytes()
    # Compare the reasons, not their codes.
    reasons = decisions["reasons"][decisions["codes"]].tolist()
    files["decisions/reasons"] = "\0".join(reasons).encode()
    return files


def _pieces(folder: Path) -> list[tuple[int, int, int]]:
    return sorted(
        (p["index"], p["start"], p["end"])
        for stats in (folder / ".work").glob("slice-*/stats.json")
        for p in json.loads(stats.read_text())["inputs"]
    )


def _same_for_any_cut(dataset: Dataset, tmp_path: Path, piece: int) -> dict[str, bytes]:
    whole = run_local(dataset, tmp_path / "whole", 1)
    expected = _outputs(tmp_path / "whole")
    assert verify(tmp_path / "whole", whole) == []
    assert len(_pieces(tmp_path / "whole")) == 1
    for slices in (1, 3, 4):
        out = tmp_path / f"cut-{slices}"
        manifest = run_local(dataset, out, slices, options=Options(slice_bytes=piece))
        assert manifest.fingerprint == whole.fingerprint
        assert _outputs(out) == expected, slices
        pieces = _pieces(out)
        assert len(pieces) > 4 and pieces[0][1] == 0
        if slices > 1:  # every slice got some of the one file
            for index in range(slices):
                stats = json.loads(
                    (out / ".work" / f"slice-{index:05d}" / "stats.json").read_text()
                )
                done = json.loads((out / ".work" / f"slice-{index:05d}" / "DONE").read_text())
                assert stats["inputs"] and done["documents"] > 0, index
    return expected


def test_one_jsonl_file_cut_into_pieces(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "one.jsonl")
    assert path.stat().st_size > 20 * KIB
    dataset = _dataset({"path": str(path), "format": "jsonl"})
    _same_for_any_cut(dataset, tmp_path, KIB)
    stats = json.loads((tmp_path / "cut-3" / MANIFEST).read_text())["stats"]
    steps = {s["name"]: s for s in stats["steps"]}
    assert steps["normalize"]["dropped"] == {"unreadable": 1}
    assert steps["dedup-exact"]["dropped"] == {"exact-duplicate": 2}
    assert stats["inputs"] == {"files": 1, "bytes": path.stat().st_size}


def test_blank_line_text_cut_between_paragraphs(tmp_path: Path) -> None:
    texts = _texts(80)
    body = "".join(t + ("\r\n\r\n" if i % 4 == 0 else "\n \n\n") for i, t in enumerate(texts))
    (tmp_path / "one.txt").write_text(body[:-3], newline="")
    dataset = _dataset({"path": str(tmp_path / "one.txt")})
    _same_for_any_cut(dataset, tmp_path, KIB)


def test_parquet_row_groups_spread_over_slices(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"body": _texts()}), path, row_group_size=16)
    assert pq.ParquetFile(path).num_row_groups > 8
    dataset = _dataset({"path": str(path), "format": "parquet", "textField": "body"})
    _same_for_any_cut(dataset, tmp_path, 2 * KIB)


def test_compressed_and_small_inputs_stay_whole(tmp_path: Path) -> None:
    import gzip

    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(_jsonl(tmp_path / "x").read_bytes()))
    (tmp_path / "x").unlink()
    (tmp_path / "small.jsonl").write_text('{"text": "a"}\n')
    dataset = _dataset({"path": str(tmp_path), "format": "jsonl"})
    inputs = list_inputs(dataset.spec)
    plan = make_plan(dataset.spec, inputs, 2, 64)
    assert [(p.input, p.whole) for p in plan.pieces] == [(0, True), (1, True)]
    assert sorted(plan.owners) == [0, 1]


def test_plan_balances_bytes_and_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"x\n" * 5000)  # 10000 bytes: 10 pieces of 1 KiB
    (tmp_path / "b.txt").write_bytes(b"y\n" * 100)
    dataset = _dataset({"path": str(tmp_path), "documentSeparator": "line"})
    inputs = list_inputs(dataset.spec)
    plan = make_plan(dataset.spec, inputs, 3, KIB)
    assert plan == make_plan(dataset.spec, inputs, 3, KIB)
    loads = [sum(p.weight or 0 for p in plan.of(i)) for i in range(3)]
    assert sum(loads) == 10200 and max(loads) - min(loads) <= KIB
    assert make_plan(dataset.spec, inputs, 3, 2 * KIB).digest != plan.digest
    assert make_plan(dataset.spec, inputs, 4, KIB).digest != plan.digest


def test_rerun_skips_slices_of_the_same_plan_only(tmp_path: Path) -> None:
    dataset = _dataset({"path": str(_jsonl(tmp_path / "one.jsonl")), "format": "jsonl"})
    first = run_local(dataset, tmp_path / "o", 2, options=Options(slice_bytes=KIB))
    marker = tmp_path / "o" / ".work" / "slice-00000" / "DONE"
    stamp = marker.stat().st_mtime_ns
    again = run_local(dataset, tmp_path / "o", 2, options=Options(slice_bytes=KIB))
    assert marker.stat().st_mtime_ns == stamp and again.fingerprint == first.fingerprint
    other = run_local(dataset, tmp_path / "o", 2, options=Options(slice_bytes=4 * KIB))
    assert marker.stat().st_mtime_ns != stamp  # another plan: the slice ran again
    assert other.fingerprint == first.fingerprint


def test_env_sets_the_piece_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = _dataset({"path": str(_jsonl(tmp_path / "one.jsonl")), "format": "jsonl"})
    monkeypatch.setenv("LLMOPS_SLICE_BYTES", str(4 * KIB))
    run_local(dataset, tmp_path / "o", 2)
    assert len(_pieces(tmp_path / "o")) > 4


def test_pieces_join_into_the_block_digest(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    rng = random.Random(1)
    path.write_bytes(b"".join(b"%x\n" % rng.getrandbits(400) for _ in range(32000)))
    assert 3 * 2**20 < path.stat().st_size < 4 * 2**20
    dataset = _dataset({"path": str(path), "documentSeparator": "line"})
    (ref,) = list_inputs(dataset.spec)
    for size in (KIB * 100, 2**20):  # pieces not on block boundaries, and on them
        plan = make_plan(dataset.spec, [ref], 3, size)
        blocks, lines = [], 0
        for piece in plan.pieces:
            with read_piece(dataset.spec, ref, piece) as (documents, finish):
                lines += sum(1 for _ in documents)
                got, length = finish()
            assert length == piece.end - piece.start  # type: ignore[operator]
            blocks += got
        assert lines == 32000 and len(blocks) == 4
        assert blocks_digest(blocks) == input_digest(path)


@pytest.mark.parametrize("paragraphs", [False, True])
def test_piece_bytes_partition_the_lines(paragraphs: bool) -> None:
    rng = random.Random(3)
    for _ in range(300):
        lines = [
            rng.choice(["", " ", "\t", "ab", "a b c", "x" * 30]) + rng.choice(["\n", "\r\n"])
            for _ in range(rng.randint(0, 40))
        ]
        data = ("".join(lines) + rng.choice(["", "tail"])).encode()
        step = rng.randint(1, 50)
        pieces = [
            b"".join(
                piece_bytes(
                    io.BufferedReader(io.BytesIO(data[start:]), 7),
                    start,
                    min(start + step, len(data)),
                    paragraphs=paragraphs,
                )
            )
            for start in range(0, len(data), step)
        ]
        assert b"".join(pieces) == data
        for piece in [p for p in pieces if p][:-1]:  # the last one holds the end
            assert piece.endswith(b"\n")
            if paragraphs:
                assert not piece.splitlines()[-1].strip()  # ends after a blank line


# -- remote inputs: S3 ranged GETs and HTTP Range requests --------------------------------


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files and honours `Range: bytes=a-b` / `bytes=a-` (when ranges are on)."""

    ranges = True

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        wanted = self.headers.get("Range")
        if not (self.ranges and wanted and wanted.startswith("bytes=")):
            return super().send_head()
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        first, _, last = wanted[len("bytes=") :].partition("-")
        start, end = int(first), int(last) + 1 if last else len(data)
        if start >= len(data):
            self.send_error(416)
            return None
        body = data[start : min(end, len(data))]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", email.utils.formatdate(usegmt=True))
        self.end_headers()
        return io.BytesIO(body)


@pytest.fixture(params=[True, False], ids=["ranges", "no-ranges"])
def http_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, bool]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_RangeHandler,), {"ranges": request.param})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, request.param
    server.shutdown()


def test_urls_cut_when_the_server_honours_range(
    http_root: tuple[str, Path, bool], tmp_path: Path
) -> None:
    base, root, ranges = http_root
    _jsonl(root / "one.jsonl")
    dataset = _dataset({"urls": [f"{base}/one.jsonl"], "format": "jsonl"})
    if ranges:
        _same_for_any_cut(dataset, tmp_path, 2 * KIB)
    else:  # read whole, by one slice
        run_local(dataset, tmp_path / "o", 3, options=Options(slice_bytes=2 * KIB))
        assert len(_pieces(tmp_path / "o")) == 1


def test_s3_objects_cut_with_ranged_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server = pytest.importorskip("moto.server")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
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
        client.put_object(
            Bucket="corpus", Key="j/one.jsonl", Body=_jsonl(tmp_path / "one.jsonl").read_bytes()
        )
        table = io.BytesIO()
        pq.write_table(pa.table({"text": _texts()}), table, row_group_size=16)
        client.put_object(Bucket="corpus", Key="p/one.parquet", Body=table.getvalue())
        for prefix, fmt in (("j/", "jsonl"), ("p/", "parquet")):
            s3 = {"bucket": "corpus", "prefix": prefix, "endpoint": endpoint}
            dataset = _dataset({"s3": s3, "format": fmt})
            _same_for_any_cut(dataset, tmp_path / fmt, 2 * KIB)
    finally:
        server.stop()
