"""Dedup stage: an Indexed Job of `groups` pods after the slices, then a small cluster step.

The reference design is datatrove's multi-stage MinHash. Pod `g` of `groups`:

- near duplicates: reads, from every slice, the MinHash rows of the documents the slice
  kept and computes the LSH keys of the bands `b` with `b % groups == g` only; per band it
  sorts the documents by (key, input, part, position) and writes every bucket of two or
  more documents, in global order, to `dedup/bands-<g>.npz`;
- exact duplicates across slices: reads the content hashes whose first 8 bytes are `g`
  modulo `groups` and writes every later copy (in global order) of a hash to
  `dedup/exact-<g>.npz`.

A pod holds its share of the corpus (a group of bands, a range of hashes), never all of it.

The cluster step (`run_cluster`, run by the prepare pod before anything else) joins them: the
exact copies are removed first; the buckets, without them, become edges from each bucket's
earliest document to the others, confirmed by the estimated Jaccard similarity when a
threshold is set (reading only those documents' MinHash rows); a union-find over the
documents of those edges keeps the earliest document of every cluster. It writes one removal
list per slice, `dedup/removed-<slice>.npz` (`exact` and `near`: rows of the slice's
meta.npz). Its memory grows with the duplicates, not with the corpus. The result is the one
a single process gets over the whole corpus, whatever the numbers of slices and pods.

Each pod and the cluster step write a marker last (the config key, the slices' plan and the
counts); a rerun with the same ones skips the finished work.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmops.api.dataset import Dataset
from llmops_trainer.data import dedup
from llmops_trainer.data.registry import KEPT
from llmops_trainer.data.slice_stage import DONE, config_key, slice_dir
from llmops_trainer.data.steps import CONTENTLESS, EXACT

log = logging.getLogger("llmops.data")
DEDUP_DIR = "dedup"
CLUSTER_DONE = "cluster.done"
_SLICE_BITS = 40  # a document's id across slices: slice << 40 | row of the slice's meta.npz
I64 = npt.NDArray[np.int64]


def dedup_dir(work_dir: Path) -> Path:
    return work_dir / DEDUP_DIR


def removal_list(work_dir: Path, index: int) -> Path:
    return dedup_dir(work_dir) / f"removed-{index:05d}.npz"


def _identity(dataset: Dataset, work_dir: Path, count: int, groups: int) -> dict[str, Any]:
    """What the stage's output depends on: the config and the finished slices' plan."""
    key = config_key(dataset.spec)
    plans = set()
    for number in range(count):
        marker = slice_dir(work_dir, number) / DONE
        done = json.loads(marker.read_text()) if marker.is_file() else {}
        if done.get("config") != key:
            raise RuntimeError(f"slice {number} of {count} has not finished (no {marker})")
        plans.add(done.get("plan"))
    if len(plans) > 1:
        raise RuntimeError(f"the {count} slices were cut by different plans of pieces: rerun them")
    plan = plans.pop() if plans else None
    return {"config": key, "plan": plan, "slices": count, "groups": groups}


def _finished(marker: Path, identity: dict[str, Any]) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == identity


def _slice_meta(work_dir: Path, number: int) -> tuple[Any, list[str]]:
    folder = slice_dir(work_dir, number)
    return np.load(folder / "meta.npz"), json.loads((folder / "stats.json").read_text())["reasons"]


def run_dedup(dataset: Dataset, work_dir: Path, group: int, groups: int, count: int) -> Path:
    """Pod `group` of `groups` over the `count` finished slices; returns the dedup folder."""
    if not 0 <= group < groups:
        raise ValueError(f"dedup group {group} outside 0..{groups - 1}")
    identity = _identity(dataset, work_dir, count, groups)
    folder = dedup_dir(work_dir)
    marker = folder / f"group-{group:05d}.done"
    if _finished(marker, identity):
        log.info("dedup group %d/%d already done, skipping", group, groups)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    spec = dataset.spec.processing.deduplication
    exact_pairs = 0
    if spec.exact:
        exact_pairs = _exact_group(work_dir, count, group, groups, folder)
    buckets = 0
    if spec.near.enabled:
        buckets = _band_group(dataset, work_dir, count, group, groups, folder)
    seconds = round(time.monotonic() - started, 3)
    marker.write_text(json.dumps(identity))
    log.info(
        "dedup group %d/%d: %d later exact copies, %d buckets of near duplicates (%.1fs)",
        group,
        groups,
        exact_pairs,
        buckets,
        seconds,
    )
    return folder


def _exact_group(work_dir: Path, count: int, group: int, groups: int, folder: Path) -> int:
    """Later copies of the content hashes of this group (the first 8 bytes modulo groups):
    a document that its slice dropped for another reason still counts as the first copy,
    one without content (empty, unreadable) is nobody's copy."""
    skip_names = {EXACT, *CONTENTLESS}
    columns: dict[str, list[Any]] = {k: [] for k in ("h0", "h1", "inp", "part", "pos", "id")}
    for number in range(count):
        meta, reasons = _slice_meta(work_dir, number)
        skip = [code for code, name in enumerate(reasons) if name in skip_names]
        hashes = np.ascontiguousarray(meta["hashes"]).view("<u8").reshape(-1, 2)
        wanted = ~np.isin(meta["reasons"], skip) & (hashes[:, 0] % np.uint64(groups) == group)
        at = np.flatnonzero(wanted)
        columns["h0"].append(hashes[at, 0])
        columns["h1"].append(hashes[at, 1])
        columns["inp"].append(meta["inputs"][at].astype(np.int64))
        columns["part"].append(meta["parts"][at])
        columns["pos"].append(meta["positions"][at])
        columns["id"].append(_ids(number, at))
    joined = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in columns.items()}
    order = np.lexsort((joined["pos"], joined["part"], joined["inp"], joined["h1"], joined["h0"]))
    h0, h1 = joined["h0"][order], joined["h1"][order]
    later = np.zeros(len(order), dtype=bool)
    later[1:] = (h0[1:] == h0[:-1]) & (h1[1:] == h1[:-1])
    removed = joined["id"][order][later]
    np.savez(folder / f"exact-{group:05d}.npz", ids=removed)
    return len(removed)


def _band_group(
    dataset: Dataset, work_dir: Path, count: int, group: int, groups: int, folder: Path
) -> int:
    """The buckets of two or more documents of this group's bands, each in global order."""
    near = dataset.spec.processing.deduplication.near
    mine = np.arange(group, near.bands, groups)
    columns: dict[str, list[Any]] = {k: [] for k in ("keys", "inp", "part", "pos", "id")}
    for number in range(count):
        meta, reasons = _slice_meta(work_dir, number)
        kept_code = reasons.index(KEPT)
        flags = meta["has_signature"]
        rows = meta["rows"]
        at = np.flatnonzero(meta["reasons"] == kept_code)
        at = at[flags[rows[at]]] if len(flags) else at[:0]
        path = slice_dir(work_dir, number) / "signatures.bin"
        if not len(at):
            continue
        matrix = np.memmap(path, dtype="<u4", mode="r").reshape(len(flags), near.num_permutations)
        for start in range(0, len(at), 65536):
            block = at[start : start + 65536]
            signatures = np.asarray(matrix[rows[block]], dtype=np.uint32)
            columns["keys"].append(dedup.band_keys(signatures, near.bands, mine))
        columns["inp"].append(meta["inputs"][at].astype(np.int64))
        columns["part"].append(meta["parts"][at])
        columns["pos"].append(meta["positions"][at])
        columns["id"].append(_ids(number, at))
        del matrix
    out: dict[str, list[I64]] = {k: [] for k in ("start", "id", "inp", "part", "pos")}
    if columns["id"]:
        keys = np.concatenate(columns["keys"])
        joined = {k: np.concatenate(v) for k, v in columns.items() if k != "keys"}
        for column in range(len(mine)):
            order = np.lexsort((joined["pos"], joined["part"], joined["inp"], keys[:, column]))
            ordered = keys[order, column]
            same = np.zeros(len(order), dtype=bool)
            same[1:] = ordered[1:] == ordered[:-1]
            member = same.copy()
            member[:-1] |= same[1:]  # in a bucket of two or more
            out["start"].append(~same[member])  # the earliest of its bucket
            for name in ("id", "inp", "part", "pos"):
                out[name].append(joined[name][order[member]])
    arrays = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}
    bucket = np.cumsum(arrays["start"].astype(np.int64)) - 1
    np.savez(
        folder / f"bands-{group:05d}.npz",
        id=arrays["id"],
        inp=arrays["inp"],
        part=arrays["part"],
        pos=arrays["pos"],
        bucket=bucket,
    )
    return int(bucket[-1] + 1) if len(bucket) else 0


def _ids(number: int, rows: npt.NDArray[np.int64]) -> I64:
    return (np.int64(number) << _SLICE_BITS) | rows.astype(np.int64)


def run_cluster(dataset: Dataset, work_dir: Path, count: int, groups: int) -> Path:
    """Joins the groups' results into one removal list per slice (see the module doc)."""
    identity = _identity(dataset, work_dir, count, groups)
    folder = dedup_dir(work_dir)
    marker = folder / CLUSTER_DONE
    if _finished(marker, identity):
        log.info("dedup clusters already joined, skipping")
        return folder
    for group in range(groups):
        group_marker = folder / f"group-{group:05d}.done"
        if not _finished(group_marker, identity):
            raise RuntimeError(f"dedup group {group} of {groups} has not finished")
    spec = dataset.spec.processing.deduplication
    exact = [np.zeros(0, np.int64)]
    if spec.exact:
        exact += [np.load(folder / f"exact-{g:05d}.npz")["ids"] for g in range(groups)]
    exact_ids = np.unique(np.concatenate(exact))
    near_ids = np.zeros(0, np.int64)
    if spec.near.enabled:
        near_ids = _clusters(dataset, work_dir, folder, groups, exact_ids)
    for number in range(count):
        mine = (exact_ids >> _SLICE_BITS) == number
        near_mine = (near_ids >> _SLICE_BITS) == number
        low = (1 << _SLICE_BITS) - 1
        np.savez(
            removal_list(work_dir, number),
            exact=exact_ids[mine] & low,
            near=near_ids[near_mine] & low,
        )
    marker.write_text(json.dumps(identity))
    log.info("dedup: %d exact and %d near duplicates removed", len(exact_ids), len(near_ids))
    return folder


def _clusters(dataset: Dataset, work_dir: Path, folder: Path, groups: int, exact_ids: I64) -> I64:
    near = dataset.spec.processing.deduplication.near
    edges: list[npt.NDArray[np.int64]] = []
    keys: dict[str, list[I64]] = {k: [] for k in ("id", "inp", "part", "pos")}
    for group in range(groups):
        buckets = np.load(folder / f"bands-{group:05d}.npz")
        stay = ~np.isin(buckets["id"], exact_ids)
        ids, bucket = buckets["id"][stay], buckets["bucket"][stay]
        for name in keys:
            keys[name].append(buckets[name][stay])
        if not len(ids):
            continue
        start = np.ones(len(ids), dtype=bool)
        start[1:] = bucket[1:] != bucket[:-1]
        first = ids[np.flatnonzero(start)[np.cumsum(start) - 1]]
        member = ~start
        edges.append(np.stack([first[member], ids[member]], axis=1))
    if not edges or not sum(len(e) for e in edges):
        return np.zeros(0, np.int64)
    pairs = np.unique(np.concatenate(edges), axis=0)
    if near.threshold > 0:
        pairs = pairs[_similarity(work_dir, near.num_permutations, pairs) >= near.threshold]
    if not len(pairs):
        return np.zeros(0, np.int64)
    # The documents of the edges, numbered in global order: the root of a cluster is the
    # earliest, as in one process over the whole corpus.
    joined = {k: np.concatenate(v) for k, v in keys.items()}
    nodes, first_at = np.unique(joined["id"], return_index=True)
    nodes_set = np.isin(nodes, pairs)
    nodes, first_at = nodes[nodes_set], first_at[nodes_set]
    order = np.lexsort((joined["pos"][first_at], joined["part"][first_at], joined["inp"][first_at]))
    rank = np.empty(len(nodes), dtype=np.int64)
    rank[order] = np.arange(len(nodes))
    ranked = rank[np.searchsorted(nodes, pairs)]
    drop = dedup._non_roots(len(nodes), ranked)  # by rank
    return np.sort(nodes[drop[rank]])


def _similarity(work_dir: Path, permutations: int, pairs: I64) -> npt.NDArray[np.float64]:
    """Estimated Jaccard similarity of each pair, from the slices' MinHash rows."""
    ids = np.unique(pairs)
    rows = np.empty((len(ids), permutations), dtype=np.uint32)
    slices = ids >> _SLICE_BITS
    low = (1 << _SLICE_BITS) - 1
    for number in np.unique(slices).tolist():
        meta = np.load(slice_dir(work_dir, number) / "meta.npz")
        flags = meta["has_signature"]
        matrix = np.memmap(
            slice_dir(work_dir, number) / "signatures.bin", dtype="<u4", mode="r"
        ).reshape(len(flags), permutations)
        mask = slices == number
        rows[mask] = matrix[meta["rows"][ids[mask] & low]]
        del matrix
    left = rows[np.searchsorted(ids, pairs[:, 0])]
    right = rows[np.searchsorted(ids, pairs[:, 1])]
    return dedup.jaccard_estimate(left, right)
