"""Training throughput of llmops' DeepSpeed trainer against a plain PyTorch DDP loop.

Both train the identical model (llmops_trainer.model.GPT, same seed) on the identical batches
(the same shards, sample order and per-rank split) with the same optimizer settings (AdamW,
weight decay on matrices, gradient clipping 1.0), in the same processes, one after the other:

- baseline: torch DistributedDataParallel, torch.optim.AdamW, autocast for bf16;
- ours: `llmops_trainer.train.Trainer` (ZeRO-2 by default) exactly as a training pod runs it,
  including its sampling, progress reporting and per-step collectives.

Throughput is tokens/s over all processes after warm-up steps. MFU (model FLOPs utilization):

    MFU = tokens/s x (6 N + 12 L H T) / (peak FLOP/s per process x processes)

with N the non-embedding parameter count (tied head counted once), L layers, H width and
T context: 6N for the weight matmuls forward and backward, 12LHT for attention (PaLM, app. B).
The peak is the card's dense bf16 figure on GPUs (or --peak-flops); on CPUs it is the FLOP/s
each process measures for a large fp32 matmul, i.e. an achievable peak, not a datasheet one.

The same comparison on a Llama-shaped `transformers` model (RoPE, RMSNorm, SwiGLU,
grouped-query attention): the baseline trains that very module under DDP, ours builds it
from the spec (`architecture: llama`); with --lora both train rank-16 LoRA adapters of a
saved random checkpoint (`model.pretrained`), and the result also gives the trained
parameters and optimizer-state bytes next to a full fine-tune's.

--nanogpt is nanoGPT's shakespeare_char configuration as its README runs it on a CPU (4 layers,
4 heads, width 128, context 64, batch 12, vocabulary 65, fp32, AdamW lr 1e-3 cosine to 1e-4 after
100 warmup steps, beta2 0.99, clipping 1.0), the global batch of 12 split over the processes.
Our GPT is built with nanoGPT's layout (`bias: false`, `activation: gelu`: no biases, exact
GELU, tied embeddings). It adds a second baseline, nanoGPT itself: its model and its loop
(random windows of a memory-mapped token file, AdamW fused on CUDA only: a loop over the
tensors on CPUs), DDP across processes. The plain loop trains our GPT with AdamW fused where
torch has it, so `llmops / plain` is what DeepSpeed and the trainer's bookkeeping cost, and
`llmops / nanoGPT` is the number users compare. Without --nproc it runs 1 and then 2
processes and prints both. Nothing sets OMP_NUM_THREADS: torchrun sets 1 per process when it
starts several, torch uses every core otherwise, and the trainer picks its own (see
llmops_trainer.train.cpu_threads).

Timing: the steps after warm-up are cut into windows of --window steps (the trainer's log
interval), the three runs alternate for --rounds rounds, and the headline is each one's median
window, which a shared machine's bursts of load disturb least; the mean over all windows is
printed too.

    python benchmarks/train_throughput.py              # small model, 2 CPU processes
    python benchmarks/train_throughput.py --nanogpt    # nanoGPT's shakespeare_char CPU run, 1 and 2
    python benchmarks/train_throughput.py --llama      # small Llama-shaped model, 2 CPUs
    python benchmarks/train_throughput.py --llama --lora
    python benchmarks/train_throughput.py --gpt2-small # GPT-2 small (124M), every GPU, bf16
    python benchmarks/train_throughput.py --llama-1b   # ~1.1B Llama-shaped, every GPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SMALL = {"layers": 4, "hidden": 128, "heads": 4, "context": 128, "vocab": 512, "micro": 8}
LLAMA_SMALL = {**SMALL, "kv_heads": 2}
# TinyLlama-1.1B's shape.
LLAMA_1B = {
    "layers": 22,
    "hidden": 2048,
    "heads": 32,
    "kv_heads": 4,
    "context": 2048,
    "vocab": 32000,
    "micro": 8,
}
# nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides; micro is the
# global batch, split over the processes.
NANOGPT = {"layers": 4, "hidden": 128, "heads": 4, "context": 64, "vocab": 65, "micro": 12}
GPT2_SMALL = {
    "layers": 12,
    "hidden": 768,
    "heads": 12,
    "context": 1024,
    "vocab": 50304,
    "micro": 16,
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpt2-small", action="store_true", help="GPT-2 small on GPUs")
    parser.add_argument("--llama", action="store_true", help="a small Llama-shaped model")
    parser.add_argument("--llama-1b", action="store_true", help="~1.1B Llama-shaped, on GPUs")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (with a llama)")
    parser.add_argument(
        "--nanogpt", action="store_true", help="nanoGPT's shakespeare_char CPU run, vs nanoGPT"
    )
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 40 / 300)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--window", type=int, default=10, help="steps per timing window")
    parser.add_argument("--rounds", type=int, help="alternations of the runs (default 1 / 3)")
    parser.add_argument(
        "--nproc", type=int, help="processes (default: 2 on CPU, every GPU; --nanogpt: 1 and 2)"
    )
    parser.add_argument("--zero-stage", type=int, help="default 2 (--nanogpt: 0)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s per process")
    parser.add_argument(
        "--shm-comm",
        action="store_true",
        help="load DeepSpeed's shared-memory comm op on CPUs (the trainer does not; compare)",
    )
    parser.add_argument("--ds-config", default="{}", help="raw DeepSpeed overlay (JSON)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    # A worker's share of the runs, and the round it starts at (the order alternates).
    parser.add_argument("--runs", default="nanogpt,plain,ours", help=argparse.SUPPRESS)
    parser.add_argument("--first-round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lora and not args.llama_1b:
        args.llama = True
    if args.zero_stage is None:
        args.zero_stage = 0 if args.nanogpt else 2
    if args.rounds is None:
        args.rounds = 3 if args.nanogpt else 1
    if args.warmup % args.window:
        parser.error("--warmup must be a multiple of --window")
    return args


def sizes(args: argparse.Namespace) -> dict[str, int]:
    if args.llama_1b:
        return LLAMA_1B
    if args.llama:
        return LLAMA_SMALL
    if args.nanogpt:
        return NANOGPT
    return GPT2_SMALL if args.gpt2_small else SMALL


def on_gpus(args: argparse.Namespace) -> bool:
    return bool(args.gpt2_small or args.llama_1b)


def model_spec(size: dict[str, int], pretrained: str | None, nanogpt: bool) -> dict[str, Any]:
    if pretrained is not None:
        return {"contextLength": size["context"], "pretrained": {"uri": pretrained}}
    spec: dict[str, Any] = {
        "numLayers": size["layers"],
        "numHeads": size["heads"],
        "hiddenSize": size["hidden"],
        "contextLength": size["context"],
    }
    if "kv_heads" in size:
        spec.update(architecture="llama", numKeyValueHeads=size["kv_heads"])
    if nanogpt:
        spec.update(bias=False, activation="gelu")
    return spec


def save_random_llama(folder: Path, size: dict[str, int]) -> None:
    """The stand-in checkpoint a LoRA run fine-tunes."""
    import torch
    from transformers import LlamaForCausalLM

    from llmops.api.trainingrun import ModelArchitecture
    from llmops_trainer.hf_models import llama_config

    architecture = ModelArchitecture.model_validate(model_spec(size, None, nanogpt=False))
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(architecture, size["vocab"])).save_pretrained(folder)


def write_data(root: Path, size: dict[str, int], tokens: int) -> None:
    from llmops_trainer.shards import Manifest, ShardWriter, write_manifest

    rng = np.random.default_rng(0)
    writer = ShardWriter(root, "train", "uint16", 0, tokens_per_shard=1 << 22)
    for _ in range(0, tokens, 4096):
        writer.add(rng.integers(1, size["vocab"], 4095))
    write_manifest(
        root, Manifest("bench", "uint16", size["vocab"], 0, splits={"train": writer.close()})
    )


def launch(args: argparse.Namespace) -> int:
    """Write the data once, then run the workers under torchrun (1 and 2 processes for
    --nanogpt without --nproc) and, for several process counts, compare them."""
    import torch

    gpus = torch.cuda.device_count() if on_gpus(args) else 0
    if args.nproc:
        counts = [args.nproc]
    elif args.nanogpt:
        counts = [1, 2]
    else:
        counts = [gpus or 2]
    steps = args.steps or (300 if on_gpus(args) or args.nanogpt else 40)
    size = sizes(args)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.nanogpt:  # about the size of tiny shakespeare; nanoGPT samples it at random
            total = 1 << 20
        else:
            total = (steps + args.warmup + 1) * 2 * size["micro"] * max(counts)
            total *= (size["context"] + 1) * args.rounds
        write_data(Path(tmp), size, total)
        if args.lora:
            save_random_llama(Path(tmp) / "base", size)
        for nproc in counts:
            code, result = launch_one(args, Path(tmp), nproc, steps, gpus)
            if code:
                return code
            if result is not None:
                results.append(result)
    if len(results) > 1:
        summary(results)
    return 0


def launch_one(
    args: argparse.Namespace, data: Path, nproc: int, steps: int, gpus: int
) -> tuple[int, dict[str, Any] | None]:
    """Run the workers for one process count and report. --nanogpt runs nanoGPT in a process
    of its own each round, as it runs for its users: without the trainer's process settings
    (ours tunes malloc, and the plain loop shares ours's process to isolate the per-step
    overhead)."""
    by_round: dict[int, dict[str, list[float]]] = {}
    meta: dict[str, Any] = {}
    if args.nanogpt:
        plan = []
        for round_ in range(args.rounds):
            order = [("nanogpt",), ("plain", "ours")]
            plan += [(runs, round_) for runs in (order if round_ % 2 == 0 else order[::-1])]
    else:
        plan = [(("plain", "ours"), 0)]
    for runs, round_ in plan:
        code, out = run_workers(args, data, nproc, steps, gpus, runs, round_)
        if code or out is None:
            return code or 1, None
        by_round.setdefault(round_, {}).update(out.pop("rates"))
        meta.update(out)
    return 0, report(args, meta, by_round)


def run_workers(
    args: argparse.Namespace,
    data: Path,
    nproc: int,
    steps: int,
    gpus: int,
    runs: tuple[str, ...],
    first_round: int,
) -> tuple[int, dict[str, Any] | None]:
    """torchrun the workers for `runs`; (exit code, rank 0's MEASURED record)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMOPS_METRICS_PORT": "0"}
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        if not args.nanogpt:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    rounds = 1 if args.nanogpt else args.rounds  # --nanogpt: the launcher alternates
    argv = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--worker",
        f"--data={data}", f"--steps={steps}", f"--warmup={args.warmup}",
        f"--window={args.window}", f"--rounds={rounds}",
        f"--zero-stage={args.zero_stage}", f"--precision={args.precision}",
        f"--ds-config={args.ds_config}", f"--runs={','.join(runs)}",
        f"--first-round={first_round}",
    ]  # fmt: skip
    flags = ("gpt2-small", "llama", "llama-1b", "lora", "nanogpt", "shm-comm")
    argv += [f"--{flag}" for flag in flags
             if getattr(args, flag.replace("-", "_"))]  # fmt: skip
    if args.peak_flops:
        argv.append(f"--peak-flops={args.peak_flops}")
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    measured = None
    for line in process.stdout:
        if line.startswith("MEASURED "):
            measured = json.loads(line.removeprefix("MEASURED "))
        else:
            print(line, end="", flush=True)
    return process.wait(), measured


def report(
    args: argparse.Namespace,
    meta: dict[str, Any],
    by_round: dict[int, dict[str, list[float]]],
) -> dict[str, Any]:
    """Print the medians and ratios of one process count; the RESULT record. With several
    rounds it also prints each round's ratios: runs next to each other in time share the
    host's state, so on a host whose speed drifts the spread of these paired ratios says
    how far the headline can be trusted."""
    measured: dict[str, list[float]] = {"nanogpt": [], "plain": [], "ours": []}
    for runs in by_round.values():
        for name, rates in runs.items():
            measured[name] += rates
    baseline_tps, ours_tps = median(measured["plain"]), median(measured["ours"])
    flops, peak, world = meta.pop("flopsPerToken"), meta["peakFlopsPerProcess"], meta["processes"]
    result = {
        **meta,
        "rounds": args.rounds,
        "loadAverage": os.getloadavg()[0],
        "baselineDdpTokensPerSecond": round(baseline_tps, 1),
        "llmopsTokensPerSecond": round(ours_tps, 1),
        "ratio": round(ours_tps / baseline_tps, 3),
        "baselineMeanTokensPerSecond": round(mean_rate(measured["plain"]), 1),
        "llmopsMeanTokensPerSecond": round(mean_rate(measured["ours"]), 1),
        "baselineP90TokensPerSecond": round(quantile(measured["plain"], 0.9), 1),
        "llmopsP90TokensPerSecond": round(quantile(measured["ours"], 0.9), 1),
        "baselineMfu": round(baseline_tps * flops / (peak * world), 4),
        "llmopsMfu": round(ours_tps * flops / (peak * world), 4),
    }
    print(
        f"model: {meta['parameters']:,} parameters, {meta['tokensPerStep']} tokens/step, "
        f"{meta['precision']}"
    )
    rows = [("plain PyTorch", "plain"), (f"llmops ZeRO-{args.zero_stage}", "ours")]
    if args.nanogpt:
        nano = median(measured["nanogpt"])
        result["nanoGptTokensPerSecond"] = round(nano, 1)
        result["nanoGptMeanTokensPerSecond"] = round(mean_rate(measured["nanogpt"]), 1)
        result["nanoGptP90TokensPerSecond"] = round(quantile(measured["nanogpt"], 0.9), 1)
        result["ratioVsNanoGpt"] = round(ours_tps / nano, 3)
        rows.insert(0, ("nanoGPT", "nanogpt"))
    for label, key in rows:
        rates = measured[key]
        print(
            f"{label:15}: {median(rates):10.1f} tokens/s median window "
            f"({mean_rate(rates):10.1f} mean, {quantile(rates, 0.9):10.1f} p90, "
            f"{len(rates)} windows)"
        )
    print(f"MFU plain {result['baselineMfu']:.2%}, llmops {result['llmopsMfu']:.2%}")
    print(f"ratio llmops / plain (DeepSpeed's and the trainer's overhead): {result['ratio']:.3f}")
    if args.nanogpt:
        print(f"ratio llmops / nanoGPT: {result['ratioVsNanoGpt']:.3f}")
    for label, key in rows[:-1]:  # the baselines
        paired = round_ratios(by_round, key)
        if len(paired) > 1:
            name = "roundRatiosVsNanoGpt" if key == "nanogpt" else "roundRatiosVsPlain"
            result[name] = [round(r, 3) for r in paired]
            shown = ", ".join(f"{r:.3f}" for r in paired)
            print(f"per round, llmops / {label}: {shown} (median {median(paired):.3f})")
    print("RESULT " + json.dumps(result))
    return result


def round_ratios(by_round: dict[int, dict[str, list[float]]], baseline: str) -> list[float]:
    """llmops over the baseline within each round (median windows), in round order."""
    return [
        median(runs["ours"]) / median(runs[baseline])
        for _, runs in sorted(by_round.items())
        if runs.get("ours") and runs.get(baseline)
    ]


def summary(results: list[dict[str, Any]]) -> None:
    """One line per process count; ratios against nanoGPT on one process."""
    first = results[0]
    reference = first.get("nanoGptTokensPerSecond") or first["baselineDdpTokensPerSecond"]
    name = "nanoGPT" if "nanoGptTokensPerSecond" in first else "plain"
    print(f"\n{'processes':>9} {'threads':>7} {name:>10} {'plain':>10} {'llmops':>10} "
          f"{'llmops/plain':>12} {'llmops/' + name + '@1':>14}")  # fmt: skip
    for r in results:
        print(
            f"{r['processes']:>9} {r['threadsPerProcess']:>7} "
            f"{r.get('nanoGptTokensPerSecond', r['baselineDdpTokensPerSecond']):>10.0f} "
            f"{r['baselineDdpTokensPerSecond']:>10.0f} {r['llmopsTokensPerSecond']:>10.0f} "
            f"{r['ratio']:>12.3f} {r['llmopsTokensPerSecond'] / reference:>14.3f}"
        )
    print("SUMMARY " + json.dumps(results))


def measured_peak(device: Any) -> float:
    """FLOP/s of a large fp32 matmul on this process's share of the CPU."""
    import torch

    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    for _ in range(3):
        a @ b
    start, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ b
    return 2 * 1024**3 * repeats / (time.perf_counter() - start)


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state (moments, fp32 master copies) this rank holds."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(value: Any) -> None:
        nonlocal total
        if isinstance(value, torch.Tensor) and value.data_ptr() not in seen:
            seen.add(value.data_ptr())
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                add(item)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)

    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrapper
    add(inner.state)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        add(getattr(optimizer, name, None))
    return total


class Timer:
    """Tokens/s of consecutive windows of `window` steps; the first `skip` steps untimed."""

    def __init__(self, tokens_per_step: int, window: int, skip: int, sync: Any) -> None:
        self.tokens_per_step, self.window, self.skip, self.sync = (
            tokens_per_step,
            window,
            skip,
            sync,
        )
        self.rates: list[float] = []
        self._start = 0.0

    def step_done(self, step: int) -> None:
        """Call after step `step` (1-based) finished."""
        if step < self.skip or step % self.window:
            return
        self.sync()
        now = time.perf_counter()
        if step > self.skip:
            self.rates.append(self.window * self.tokens_per_step / (now - self._start))
        self._start = now


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def quantile(values: list[float], q: float) -> float:
    """The value a fraction q of the windows stay below: q=0.9 approaches the rate of a
    machine nobody else is using."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mean_rate(rates: list[float]) -> float:
    """Tokens/s over all windows together (equal tokens each: the harmonic mean)."""
    return len(rates) / sum(1 / r for r in rates)


def nanogpt_model(size: dict[str, int]) -> Any:
    """nanoGPT's model.py GPT with bias=False and dropout 0 (what the shakespeare_char CPU
    run trains): no biases, LayerNorm without bias, exact GELU, tied embeddings, flash SDPA."""
    import math

    import torch
    import torch.nn.functional as F
    from torch import nn

    width, heads = size["hidden"], size["heads"]

    class LayerNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = LayerNorm(), LayerNorm()
            self.c_attn = nn.Linear(width, 3 * width, bias=False)
            self.attn_proj = nn.Linear(width, width, bias=False)
            self.c_fc = nn.Linear(width, 4 * width, bias=False)
            self.gelu = nn.GELU()
            self.mlp_proj = nn.Linear(4 * width, width, bias=False)
            # nanoGPT calls its dropouts (p=0 here) as modules; they cost a call each.
            self.resid_dropout, self.mlp_dropout = nn.Dropout(0.0), nn.Dropout(0.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(width, dim=2)
            q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(b, t, c)
            x = x + self.resid_dropout(self.attn_proj(y))
            return x + self.mlp_dropout(self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x)))))

    class NanoGPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(size["vocab"], width)
            self.wpe = nn.Embedding(size["context"], width)
            self.drop = nn.Dropout(0.0)
            self.h = nn.ModuleList(Block() for _ in range(size["layers"]))
            self.ln_f = LayerNorm()
            self.lm_head = nn.Linear(width, size["vocab"], bias=False)
            self.wte.weight = self.lm_head.weight
            for module in self.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * size["layers"]))

        def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return NanoGPT()


def cosine_lr(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    """nanoGPT's get_lr."""
    import math

    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    ratio = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)


def adamw_kwargs(device: Any) -> dict[str, Any]:
    """fused where torch has it for the device (CUDA; CPU since torch 2.4), else foreach."""
    import torch

    probe = torch.nn.Parameter(torch.zeros(1, device=device))
    try:
        torch.optim.AdamW([probe], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {"foreach": True}


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from llmops.api.trainingrun import TrainingRun
    from llmops_trainer import hf_models
    from llmops_trainer.batches import Objective, SampleOrder, Windows, make_batch, rank_positions
    from llmops_trainer.model import GPT, GPTConfig, flops_per_token, lm_loss
    from llmops_trainer.plan import batch_plan
    from llmops_trainer.shards import read_manifest
    from llmops_trainer.train import Paths, Trainer, param_groups, peak_flops

    on_gpu = get_accelerator().device_name() != "cpu"
    if not on_gpu and not args.shm_comm:
        from llmops_trainer.train import without_nvml_cuda_check, without_shm_comm

        without_shm_comm()  # as the trainer starts (it comes after this and finds it done)
        # As the trainer does, for the baselines too: nanoGPT never imports DeepSpeed.
        without_nvml_cuda_check()
    if not on_gpu and "ours" in args.runs.split(","):
        # The trainer tunes malloc as it starts (llmops_trainer.cpu_memory). The plain loop
        # shares its process, so it runs with the same settings from the start and
        # `llmops / plain` stays the per-step overhead; nanoGPT runs in a process of its
        # own, as its users run it.
        from llmops_trainer.cpu_memory import keep_freed_memory

        keep_freed_memory()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if on_gpu else "cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    precision = args.precision if args.precision != "auto" else ("bf16" if on_gpu else "fp32")
    size = sizes(args)
    steps = args.warmup + args.steps
    assert args.data is not None
    llama = "kv_heads" in size
    pretrained = str(args.data / "base") if args.lora else None
    lora = {"rank": 16, "alpha": 32, "dropout": 0.0} if args.lora else None
    if args.nanogpt:
        if size["micro"] % world:
            raise SystemExit(f"--nanogpt splits a batch of {size['micro']}: use 1, 2, 3, 4 or 6")
        hyperparameters: dict[str, Any] = {
            "microBatchSize": size["micro"] // world,
            "globalBatchSize": size["micro"],
            "learningRate": 1e-3,
            "minLearningRate": 1e-4,
            "warmupSteps": min(100, steps - 1),
            "schedule": "cosine",
            "adamBeta2": 0.99,
            "weightDecay": 0.1,
            "gradientClipping": 1.0,
        }
    else:
        hyperparameters = {
            "microBatchSize": size["micro"],
            "learningRate": 3e-4,
            "schedule": "constant",
        }
    run = TrainingRun.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "bench"},
            "spec": {
                "datasetRef": {"name": "bench"},
                "model": model_spec(size, pretrained, args.nanogpt),
                **({"adapter": lora} if lora else {}),
                "hyperparameters": {"maxSteps": steps, **hyperparameters},
                "deepspeed": {
                    "zeroStage": args.zero_stage,
                    "precision": precision,
                    "config": json.loads(args.ds_config),
                },
                "resources": {"procsPerNode": world, "gpusPerNode": world if on_gpu else 0},
                "checkpointing": {"intervalSteps": 10**8},
                "evaluation": {"intervalSteps": 10**8},
            },
        }
    )
    spec = run.spec
    hp = spec.hyperparameters
    manifest = read_manifest(args.data)
    windows = Windows(args.data, manifest, "train", size["context"])
    order = SampleOrder(len(windows), hp.seed)
    objective = Objective("causal-lm", manifest.vocab_size, hp.seed)
    plan = batch_plan(spec, world)
    config = GPTConfig(
        vocab_size=manifest.vocab_size,
        context_length=size["context"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        hidden_size=size["hidden"],
        bias=spec.model.with_biases,
        activation=spec.model.activation_function,
    )
    tokens_per_step = plan.global_batch_size * size["context"]
    threads = torch.get_num_threads()  # what torchrun / OMP_NUM_THREADS gave the baselines

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    def lr_at(step: int) -> float:
        if hp.schedule == "constant":
            return hp.learning_rate
        return cosine_lr(step, hp.learning_rate, hp.min_learning_rate, hp.warmup_steps, steps)

    def make_model() -> torch.nn.Module:
        """The model ours trains, built the same way: GPT, or the transformers llama (with
        the same adapters) wrapped as the trainer wraps it."""
        if not llama:
            return GPT(config)
        network = hf_models.build(
            spec.model,
            manifest.vocab_size,
            None if pretrained is None else Path(pretrained),
            {"zero_optimization": {"stage": 0}},
        )
        if spec.adapter is not None:
            network = hf_models.add_adapter(network, spec.adapter, device)
        return hf_models.CausalLM(network, size["context"])

    def ddp(model: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if on_gpu else None
        )

    # -- baseline: a plain PyTorch loop (DDP) of the same model ---------------------------
    def baseline() -> tuple[list[float], int]:
        torch.manual_seed(hp.seed)
        model = make_model().to(device)
        wrapped = ddp(model)
        optimizer = torch.optim.AdamW(
            param_groups(model, hp.weight_decay),
            lr=hp.learning_rate,
            betas=(hp.adam_beta1, hp.adam_beta2),
            eps=hp.adam_epsilon,
            **adamw_kwargs(device),
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        timer = Timer(tokens_per_step, args.window, args.warmup, sync)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            positions = rank_positions(
                step * plan.global_batch_size, plan.global_batch_size, world, rank
            )
            inputs, labels = make_batch(windows, [order.index(p) for p in positions], objective)
            with autocast:
                loss = lm_loss(wrapped(inputs.to(device)), labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # what a logging loop does every step
            timer.step_done(step + 1)
        parameters = model.num_parameters()
        del wrapped, model, optimizer
        if on_gpu:
            torch.cuda.empty_cache()
        return timer.rates, parameters

    # -- baseline: nanoGPT's own model and loop (--nanogpt) -------------------------------
    def nanogpt() -> list[float]:
        torch.manual_seed(1337 + rank)
        model = nanogpt_model(size).to(device)
        wrapped = ddp(model)
        groups = param_groups(model, hp.weight_decay)
        fused = {"fused": True} if on_gpu else {}  # nanoGPT: fused AdamW on CUDA only
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.99), **fused)
        path = args.data / manifest.splits["train"].shards[0].path
        context, batch = size["context"], plan.micro_batch_size

        def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
            data = np.memmap(path, dtype=np.uint16, mode="r")  # re-opened per batch, as nanoGPT
            ix = torch.randint(len(data) - context, (batch,))
            x = torch.stack([torch.from_numpy(data[i : i + context].astype(np.int64)) for i in ix])
            y = torch.stack(
                [torch.from_numpy(data[i + 1 : i + 1 + context].astype(np.int64)) for i in ix]
            )
            return x.to(device), y.to(device)

        timer = Timer(tokens_per_step, args.window, args.warmup, sync)
        x, y = get_batch()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = wrapped(x, y)
            x, y = get_batch()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if rank == 0:
                loss.item()
            timer.step_done(step + 1)
        del wrapped, model, optimizer
        return timer.rates

    # -- ours: the trainer as a pod runs it ----------------------------------------------
    peak = args.peak_flops or peak_flops(device) or measured_peak(device)
    os.environ["LLMOPS_PEAK_FLOPS"] = str(peak)
    os.environ["LLMOPS_LOG_INTERVAL"] = str(args.window)

    trained: dict[str, int] = {}
    calls = [0]

    def ours() -> list[float]:
        # One folder for every rank, as a pod's checkpoint volume is: a checkpoint is read
        # back whole (the final export, a LoRA checkpoint's adapter) from all ranks' files.
        calls[0] += 1
        out = args.data / "bench-runs" / f"ours-{calls[0]}"  # in the launcher's temp folder
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(shutil.rmtree, out, ignore_errors=True)
            paths = Paths(
                data=args.data,
                checkpoints=out / "ckpt",
                output=out,
                init=None,
                pretrained=None if pretrained is None else Path(pretrained),
            )
            trainer = Trainer(run, paths)
            trainer.setup()
            trained["threads"] = torch.get_num_threads()
            trainer.train()
            module = trainer.engine.module
            trained["parameters"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
            trained["optimizerStateBytes"] = optimizer_state_bytes(trainer.engine.optimizer)
            # The trainer's own log windows after the warm-up ones.
            rates = [
                h["tokensPerSecond"]
                for h in trainer.state.history
                if "tokensPerSecond" in h and h["step"] > args.warmup
            ]
            del trainer
            dist.barrier()  # every rank is done with the folder before rank 0 removes it
            if rank != 0:
                cleanup.pop_all()
        torch.set_num_threads(threads)  # the trainer picks its own; the baselines keep theirs
        return rates

    # The runs alternate (order reversed every other round): a shared machine's load drifts.
    measured: dict[str, list[float]] = {"nanogpt": [], "plain": [], "ours": []}
    parameters = 0
    wanted = args.runs.split(",")
    for round_ in range(args.first_round, args.first_round + args.rounds):
        runs = ["nanogpt", "plain", "ours"] if args.nanogpt else ["plain", "ours", "plain"]
        for name in [n for n in (runs if round_ % 2 == 0 else runs[::-1]) if n in wanted]:
            if name == "nanogpt":
                measured[name] += nanogpt()
            elif name == "plain":
                rates, parameters = baseline()
                measured[name] += rates
            else:
                measured[name] += ours()

    if rank == 0:
        record: dict[str, Any] = {"rates": {k: v for k, v in measured.items() if v}}
        if "ours" in wanted:  # what the report needs besides the rates
            if llama:
                shape = hf_models.Shape(
                    "llama", size["layers"], size["hidden"], size["vocab"], size["context"]
                )
                flops = hf_models.flops_per_token(
                    shape, parameters, size["context"], lora is not None
                )
            else:
                flops = flops_per_token(config, parameters)
            if args.nanogpt:
                model_name = "gpt (nanoGPT shakespeare_char)"
            else:
                model_name = ("llama" if llama else "gpt") + ("+lora" if lora else "")
            record |= {
                "machine": torch.cuda.get_device_name(device)
                if on_gpu
                else f"{os.cpu_count()} CPU cores",
                "processes": world,
                "threadsPerProcess": trained["threads"],
                "baselineThreadsPerProcess": threads,
                "precision": precision,
                "zeroStage": args.zero_stage,
                "shmCommLoaded": bool(getattr(deepspeed.comm.cdb, "shm_comm_op", None)),
                "model": model_name,
                "parameters": parameters,
                "trainedParameters": trained["parameters"],
                "optimizerStateBytesRank0": trained["optimizerStateBytes"],
                "tokensPerStep": tokens_per_step,
                "timedSteps": args.steps,
                "windowSteps": args.window,
                "peakFlopsPerProcess": peak,
                "flopsPerToken": flops,
            }
        print("MEASURED " + json.dumps(record), flush=True)
    dist.barrier()


def main() -> int:
    args = parse()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
