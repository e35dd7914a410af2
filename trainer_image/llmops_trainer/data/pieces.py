"""Pieces: the unit of work of a slice, so that one big input spreads over many slices.

Every slice computes the same `Plan` from the same input listing:

- An uncompressed text or jsonl input (a local or volume file, an S3 object, a URL whose server
  honours Range requests) larger than the piece size is cut into byte ranges of that size
  (a multiple of the 1 MiB digest block when it is one MiB or more). The rule of Hadoop and
  datatrove keeps every line in exactly one piece: a piece starting at offset s > 0 starts
  after the first newline at or after s, and ends with the first newline at or after its end
  (or at the end of the input). Blank-line separated text cuts after blank lines instead: a
  piece starts after the first blank line that follows the line holding s, so a paragraph
  is never split.
- A parquet input larger than the piece size is cut into byte ranges too; a row group
  belongs to the piece holding its first byte (Spark's rule), read with ranged reads.
- Compressed inputs (gzip, zstd, bz2, xz), Hub files, URLs without Range support or with a
  `#sha256=` checksum and text read as one document per file stay whole.

Pieces go to slices largest first, each to the slice with the fewest bytes so far (ties: the
lower slice number), which balances the bytes; the plan's digest goes into each slice's DONE
file, so a rerun redoes a slice whose plan changed, and the later stages refuse slices of different
plans. The piece size is `spec.sliceBytes`; tests set a smaller one with `Options.slice_bytes`
or the environment variable LLMOPS_SLICE_BYTES (which the operator never sets).

A slice numbers its documents per part: a piece of text is one part (its start offset), a
row group of a cut parquet input another (its index), a whole input part 0. The prepare stage orders
by (input, part, position) and renumbers positions per input, so order, output and
fingerprint do not depend on the plan. Each piece hashes the digest blocks that start in its
byte range (reading on to the block's end), and the prepare stage joins them into the input's block
digest (data.collect).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

from llmops.api.dataset import DatasetSpec, DataSource
from llmops_trainer.data.collect import (
    CHUNK,
    DIGEST_BLOCK,
    Document,
    InputRef,
    _Hashing,
    is_compressed,
    open_input,
    open_raw,
    parquet_rows,
    probe_url,
    read_documents,
    read_range,
)

SLICE_BYTES_ENV = "LLMOPS_SLICE_BYTES"  # tests only: a piece size below the API's minimum


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of input `input` (its index in the listing), or the whole input."""

    input: int
    start: int = 0
    end: int | None = None  # None: a whole input
    size: int | None = None  # the input's size, when known

    @property
    def whole(self) -> bool:
        return self.end is None

    @property
    def weight(self) -> int | None:
        return self.size if self.end is None else self.end - self.start


@dataclass(frozen=True)
class Plan:
    """Every piece of every input (in input order) and the slice that reads it."""

    pieces: list[Piece]
    owners: list[int]
    digest: str

    def of(self, index: int) -> list[Piece]:
        """The pieces of slice `index`, in input order."""
        return [p for p, owner in zip(self.pieces, self.owners, strict=True) if owner == index]


def piece_size(spec: DatasetSpec, override: int | None = None) -> int:
    """`override` (Options.slice_bytes), else LLMOPS_SLICE_BYTES, else spec.sliceBytes."""
    if override:
        return override
    if os.environ.get(SLICE_BYTES_ENV):
        return int(os.environ[SLICE_BYTES_ENV])
    return spec.slice_bytes


def make_plan(spec: DatasetSpec, inputs: list[InputRef], count: int, size: int) -> Plan:
    """Cut the inputs into pieces of at most `size` bytes and assign them to `count` slices."""
    step = size if size < DIGEST_BLOCK else -(-size // DIGEST_BLOCK) * DIGEST_BLOCK
    pieces: list[Piece] = []
    for number, ref in enumerate(inputs):
        total = _cuttable_size(spec, ref, size)
        if total is None:
            pieces.append(Piece(number, size=ref.size))
            continue
        pieces += [
            Piece(number, start, min(start + step, total), total) for start in range(0, total, step)
        ]
    weights = [size if p.weight is None else p.weight for p in pieces]
    owners = [0] * len(pieces)
    loads = [(0, slice_) for slice_ in range(count)]
    for number in sorted(range(len(pieces)), key=lambda i: (-weights[i], i)):
        load, slice_ = heapq.heappop(loads)
        owners[number] = slice_
        heapq.heappush(loads, (load + weights[number], slice_))
    described = [
        [p.input, inputs[p.input].location, p.start, p.end, p.size, owner]
        for p, owner in zip(pieces, owners, strict=True)
    ]
    digest = hashlib.sha256(json.dumps([count, described]).encode()).hexdigest()
    return Plan(pieces, owners, digest)


def _cuttable_size(spec: DatasetSpec, ref: InputRef, size: int) -> int | None:
    """The input's size when it is to be cut, else None."""
    source = spec.sources[ref.source]
    if source.format == "text" and source.document_separator == "file":
        return None
    if ref.kind in ("file", "s3"):
        if ref.size is None or ref.size <= size:
            return None
        return None if is_compressed(read_range(spec, ref, 0, 6)) else ref.size
    if ref.kind == "url" and "#sha256=" not in ref.location:
        total, head = probe_url(ref.location)
        if total is None or total <= size or is_compressed(head):
            return None
        return total
    return None


# (part, document) pairs of a piece.
Documents = Iterator[tuple[int, Document]]
# Called after reading: the digests of the blocks the piece owns, and its size in bytes.
Finish = Callable[[], tuple[list[bytes], int]]


@contextmanager
def read_piece(
    spec: DatasetSpec, ref: InputRef, piece: Piece
) -> Iterator[tuple[Documents, Finish]]:
    """The documents of a piece with their parts, and a function to call after reading them
    that returns the digests of the blocks the piece owns and its size (a whole input: the
    bytes read)."""
    source = spec.sources[ref.source]
    if piece.end is None:
        with open_input(spec, ref) as (stream, hashing):
            documents = read_documents(stream, source, unreadable=True)
            yield ((0, d) for d in documents), lambda: (hashing.finish(), hashing.size)
        return
    assert piece.size is not None
    low = _block_start(piece.start)
    high = min(_block_start(piece.end), piece.size)
    length = piece.end - piece.start
    with ExitStack() as stack:
        if source.format == "parquet":

            def finish() -> tuple[list[bytes], int]:
                if low >= high:
                    return [], length
                raw = open_raw(spec, ref, low)
                stack.callback(raw.close)
                return _Hashing(raw, low, low, high).finish(), length

            handle = stack.enter_context(_random_access(spec, ref, piece.size))
            yield _parquet_piece(handle, source, piece.start, piece.end), finish
            return
        raw = open_raw(spec, ref, piece.start)
        stack.callback(raw.close)
        hashing = _Hashing(raw, piece.start, low, high)
        paragraphs = source.format == "text" and source.document_separator == "blank-line"
        chunks = piece_bytes(
            io.BufferedReader(hashing, CHUNK), piece.start, piece.end, paragraphs=paragraphs
        )
        stream = io.BufferedReader(_Chunks(chunks), CHUNK)
        documents = read_documents(stream, source, unreadable=True)
        yield ((piece.start, d) for d in documents), lambda: (hashing.finish(), length)


def _block_start(offset: int) -> int:
    """The first digest block boundary at or after `offset`."""
    return -(-offset // DIGEST_BLOCK) * DIGEST_BLOCK


def _blank(line: bytes) -> bool:
    return not line.decode("utf-8", "replace").strip()


def piece_bytes(raw: IO[bytes], start: int, end: int, *, paragraphs: bool) -> Iterator[bytes]:
    """The bytes of the piece [start, end) of a stream positioned at `start` (see the module
    docstring): whole lines (paragraphs), each in exactly one piece."""
    pos = start
    started = start == 0
    partial = start > 0  # the next line is the rest of the line holding `start`
    past = False  # the line holding the first newline at or after `end` is behind
    while True:
        if started and not past and pos < end:  # within the piece: pass chunks on
            chunk = raw.read(min(CHUNK, end - pos))
            if not chunk:
                return
            pos += len(chunk)
            yield chunk
            continue
        line = raw.readline()
        if not line:
            return
        pos += len(line)
        first, partial = partial, False
        if paragraphs and past and _blank(line):
            if started:
                yield line
            return  # the first blank line after the one holding `end` ends the piece
        if started:
            yield line
        elif not paragraphs or (not first and _blank(line)):
            started = True  # after the first newline (blank line) at or after `start`
        if pos > end:  # this line holds the first newline at or after `end`
            if not paragraphs:
                return
            past = True


class _Chunks(io.RawIOBase):
    """A byte stream over an iterator of chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.left:
            chunk = next(self.chunks, b"")
            if not chunk:
                return 0
            self.left = memoryview(chunk)
        n = min(len(buffer), len(self.left))
        buffer[:n] = self.left[:n]
        self.left = self.left[n:]
        return n


class _Ranged(io.RawIOBase):
    """A seekable file over ranged reads of an S3 object or a URL."""

    def __init__(self, fetch: Callable[[int, int], bytes], size: int) -> None:
        self.fetch, self.size, self.pos = fetch, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def readinto(self, buffer: Any) -> int:
        data = self.fetch(self.pos, min(self.pos + len(buffer), self.size))
        n = len(data)
        buffer[:n] = data
        self.pos += n
        return n


@contextmanager
def _random_access(spec: DatasetSpec, ref: InputRef, size: int) -> Iterator[IO[bytes]]:
    if ref.kind == "file":
        with open(ref.location, "rb") as handle:
            yield handle
        return

    def fetch(start: int, end: int) -> bytes:
        return read_range(spec, ref, start, end)

    with io.BufferedReader(_Ranged(fetch, size), CHUNK) as ranged:
        yield ranged


def _parquet_piece(handle: IO[bytes], source: DataSource, start: int, end: int) -> Documents:
    """The rows of the row groups whose first byte lies in [start, end), part = row group."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(handle)
    for group in range(table.num_row_groups):
        if start <= _group_offset(table.metadata.row_group(group)) < end:
            for document in parquet_rows(table, source, [group]):
                yield group, document


def _group_offset(group: Any) -> int:
    """The first byte of a row group: the first page of its first-written column chunk."""
    offsets = []
    for number in range(group.num_columns):
        column = group.column(number)
        offset = column.data_page_offset
        if column.has_dictionary_page and column.dictionary_page_offset:
            offset = min(offset, column.dictionary_page_offset)
        offsets.append(offset)
    return int(min(offsets))
