"""What every slice wrote, read back as one corpus in global (input, position) order, so the
merge does not depend on the number of slices or on the pieces the inputs were cut into:
documents are ordered by (input, part, position in the part) and then numbered per input,
and the pieces' digest blocks are joined into each input's block digest."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmops_trainer.data.collect import blocks_digest
from llmops_trainer.data.registry import KEPT
from llmops_trainer.data.slice_stage import DONE, slice_dir


@dataclass
class Corpus:
    """Every document read by every slice, in global (input, position) order."""

    slices: list[Path]
    slice_of: npt.NDArray[np.int64]
    meta_index: npt.NDArray[np.int64]  # row of the slice's meta.npz
    input_of: npt.NDArray[np.int64]
    position_of: npt.NDArray[np.int64]
    rows: npt.NDArray[np.int64]
    reasons: list[str]
    codes: npt.NDArray[np.int64]
    hashes: npt.NDArray[np.uint8]
    raw_bytes: npt.NDArray[np.int64]
    out_bytes: npt.NDArray[np.int64]
    has_signature: list[npt.NDArray[np.bool_]]
    inputs: list[dict[str, Any]]  # per input: index, source, location, digest, bytes, pieces
    slice_stats: list[dict[str, Any]]

    def code(self, reason: str) -> int:
        """The code of a drop reason, added when no slice gave it."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        return self.reasons.index(reason)

    def signature_maps(self, permutations: int) -> list[npt.NDArray[np.uint32]]:
        """Each slice's MinHash rows, memory-mapped."""
        maps = []
        for folder, flags in zip(self.slices, self.has_signature, strict=True):
            path = folder / "signatures.bin"
            if len(flags) and path.stat().st_size:
                rows = np.memmap(path, dtype="<u4", mode="r").reshape(len(flags), permutations)
                maps.append(rows)
            else:
                maps.append(np.zeros((0, permutations), dtype=np.uint32))
        return maps

    def documents(self, wanted: npt.NDArray[np.bool_]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(global index, stored record) of the wanted documents, in global order."""
        handles = [(folder / "docs.jsonl").open(encoding="utf-8") for folder in self.slices]
        cursor = [0] * len(handles)
        try:
            for index in np.flatnonzero(self.rows >= 0).tolist():
                number, row = int(self.slice_of[index]), int(self.rows[index])
                handle = handles[number]
                while cursor[number] <= row:
                    line = handle.readline()
                    cursor[number] += 1
                if wanted[index]:
                    yield index, json.loads(line)
        finally:
            for handle in handles:
                handle.close()

    def global_positions(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(offsets, lookup): the global index of row `i` of slice `s`'s meta.npz is
        `lookup[offsets[s] + i]`."""
        count = len(self.slices)
        sizes = np.bincount(self.slice_of, minlength=count)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        lookup = np.empty(len(self.slice_of), dtype=np.int64)
        lookup[offsets[self.slice_of] + self.meta_index] = np.arange(len(self.slice_of))
        return offsets, lookup

    def signed(self) -> npt.NDArray[np.bool_]:
        """Which documents have a MinHash signature (kept by their slice, with shingles)."""
        sizes = [len(flags) for flags in self.has_signature]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        flags = np.concatenate([*self.has_signature, np.zeros(1, dtype=bool)])
        written = self.rows >= 0
        out = np.zeros(len(self.rows), dtype=bool)
        out[written] = flags[offsets[self.slice_of[written]] + self.rows[written]]
        return out

    def source_index(self) -> npt.NDArray[np.int64]:
        """The source of every document."""
        lookup = np.zeros(max((i["index"] for i in self.inputs), default=0) + 1, dtype=np.int64)
        for item in self.inputs:
            lookup[item["index"]] = item["source"]
        return lookup[self.input_of]


def load_corpus(work_dir: Path, count: int, key: str) -> Corpus:
    """The finished slices' outputs for config `key`; fails when a slice has not finished."""
    folders = [slice_dir(work_dir, i) for i in range(count)]
    names: dict[str, int] = {KEPT: 0}
    parts: dict[str, list[Any]] = {
        k: [] for k in ("slice", "idx", "inp", "part", "pos", "code", "hash", "raw", "out", "rows")
    }
    has_signature, pieces, slice_stats = [], [], []
    plans = set()
    for number, folder in enumerate(folders):
        marker = folder / DONE
        if not marker.is_file() or json.loads(marker.read_text()).get("config") != key:
            raise RuntimeError(f"slice {number} of {count} has not finished (no {marker})")
        plans.add(json.loads(marker.read_text()).get("plan"))
        stats = json.loads((folder / "stats.json").read_text())
        meta = np.load(folder / "meta.npz")
        local = np.array([names.setdefault(n, len(names)) for n in stats["reasons"]])
        parts["slice"].append(np.full(len(meta["reasons"]), number))
        parts["idx"].append(np.arange(len(meta["reasons"])))
        parts["inp"].append(meta["inputs"])
        parts["part"].append(meta["parts"])
        parts["pos"].append(meta["positions"])
        parts["code"].append(
            local[meta["reasons"]] if len(meta["reasons"]) else np.zeros(0, np.int64)
        )
        parts["hash"].append(meta["hashes"])
        parts["raw"].append(meta["raw_bytes"])
        parts["out"].append(meta["out_bytes"])
        parts["rows"].append(meta["rows"])
        has_signature.append(meta["has_signature"])
        pieces += stats["inputs"]
        slice_stats.append(stats)
    if len(plans) > 1:
        raise RuntimeError(f"the {count} slices were cut by different plans of pieces: rerun them")
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
    order = np.lexsort((joined["pos"], joined["part"], joined["inp"]))
    input_of = joined["inp"][order].astype(np.int64)
    return Corpus(
        slices=folders,
        slice_of=joined["slice"][order].astype(np.int64),
        meta_index=joined["idx"][order].astype(np.int64),
        input_of=input_of,
        position_of=_positions(input_of),
        rows=joined["rows"][order],
        reasons=sorted(names, key=names.__getitem__),
        codes=joined["code"][order].astype(np.int64),
        hashes=joined["hash"].reshape(-1, 16)[order].astype(np.uint8),
        raw_bytes=joined["raw"][order],
        out_bytes=joined["out"][order],
        has_signature=has_signature,
        inputs=_inputs(pieces),
        slice_stats=slice_stats,
    )


def _positions(input_of: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Each document's position in its input, given documents in global order."""
    if not len(input_of):
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, input_of[1:] != input_of[:-1]])
    lengths = np.diff(np.r_[starts, len(input_of)])
    return np.arange(len(input_of), dtype=np.int64) - np.repeat(starts, lengths)


def _inputs(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per input from the pieces the slices read, which must cover each input
    exactly; its digest joins the pieces' digest blocks in order."""
    by_input: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for piece in pieces:
        by_input[piece["index"]].append(piece)
    inputs = []
    for index in sorted(by_input):
        chain = sorted(by_input[index], key=lambda p: p["start"])
        at = 0
        for piece in chain:
            if piece["start"] != at:
                raise RuntimeError(f"input {piece['location']}: no piece covers byte {at}")
            at = piece["end"]
        if at != chain[-1]["size"]:
            raise RuntimeError(f"input {chain[-1]['location']}: no piece covers byte {at}")
        blocks = [bytes.fromhex(b) for piece in chain for b in piece["blocks"]]
        first = chain[0]
        inputs.append(
            {
                "index": index,
                "source": first["source"],
                "location": first["location"],
                "digest": blocks_digest(blocks),
                "bytes": sum(int(p["bytes"]) for p in chain),
                "pieces": len(chain),
            }
        )
    return inputs
