"""The Dataset's inputs as the slices read them: each input is covered exactly by the
pieces it was cut into (byte ranges within files), and the pieces' digest blocks join into
the input's block digest, so the result does not depend on how many slices read it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from llmops_trainer.data.collect import blocks_digest


def inputs(pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
