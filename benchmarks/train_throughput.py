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

    python benchmarks/train_throughput.py              # small model, 2 CPU processes
    python benchmarks/train_throughput.py --llama      # small Llama-shaped model, 2 CPUs
    python benchmarks/train_throughput.py --llama --lora
    python benchmarks/train_throughput.py --gpt2-small # GPT-2 small (124M), every GPU, bf16
    python benchmarks/train_throughput.py --llama-1b   # ~1.1B Llama-shaped, every GPU, bf16
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 40 / 300)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--nproc", type=int, help="processes (default: 2 on CPU, every GPU)")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s per process")
    parser.add_argument("--ds-config", default="{}", help="raw DeepSpeed overlay (JSON)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lora and not args.llama_1b:
        args.llama = True
    return args


def sizes(args: argparse.Namespace) -> dict[str, int]:
    if args.llama_1b:
        return LLAMA_1B
    if args.llama:
        return LLAMA_SMALL
    return GPT2_SMALL if args.gpt2_small else SMALL


def on_gpus(args: argparse.Namespace) -> bool:
    return bool(args.gpt2_small or args.llama_1b)


def model_spec(size: dict[str, int], pretrained: str | None) -> dict[str, Any]:
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
    return spec


def save_random_llama(folder: Path, size: dict[str, int]) -> None:
    """The stand-in checkpoint a LoRA run fine-tunes."""
    import torch
    from transformers import LlamaForCausalLM

    from llmops.api.trainingrun import ModelArchitecture
    from llmops_trainer.hf_models import llama_config

    architecture = ModelArchitecture.model_validate(model_spec(size, None))
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
    """Write the data once, then run the workers under torchrun."""
    import torch

    gpus = torch.cuda.device_count() if on_gpus(args) else 0
    nproc = args.nproc or (gpus or 2)
    steps = args.steps or (300 if on_gpus(args) else 40)
    size = sizes(args)
    with tempfile.TemporaryDirectory() as tmp:
        total = (steps + args.warmup + 1) * 2 * size["micro"] * nproc * (size["context"] + 1)
        write_data(Path(tmp), size, total)
        if args.lora:
            save_random_llama(Path(tmp) / "base", size)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLMOPS_METRICS_PORT": "0"}
        if not gpus:
            env["DS_ACCELERATOR"] = "cpu"
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        argv = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={port}", __file__, "--worker",
            f"--data={tmp}", f"--steps={steps}", f"--warmup={args.warmup}",
            f"--zero-stage={args.zero_stage}", f"--precision={args.precision}",
            f"--ds-config={args.ds_config}",
        ]  # fmt: skip
        argv += [f"--{flag}" for flag in ("gpt2-small", "llama", "llama-1b", "lora")
                 if getattr(args, flag.replace("-", "_"))]  # fmt: skip
        if args.peak_flops:
            argv.append(f"--peak-flops={args.peak_flops}")
        return subprocess.run(argv, env=env, check=False).returncode


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
    run = TrainingRun.model_validate(
        {
            "apiVersion": "llmops.dev/v1alpha1",
            "kind": "TrainingRun",
            "metadata": {"name": "bench"},
            "spec": {
                "datasetRef": {"name": "bench"},
                "model": model_spec(size, pretrained),
                **({"adapter": lora} if lora else {}),
                "hyperparameters": {
                    "maxSteps": steps,
                    "microBatchSize": size["micro"],
                    "learningRate": 3e-4,
                    "schedule": "constant",
                },
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
    manifest = read_manifest(args.data)
    windows = Windows(args.data, manifest, "train", size["context"])
    order = SampleOrder(len(windows), spec.hyperparameters.seed)
    objective = Objective("causal-lm", manifest.vocab_size, spec.hyperparameters.seed)
    plan = batch_plan(spec, world)
    config = GPTConfig(
        vocab_size=manifest.vocab_size,
        context_length=size["context"],
        num_layers=size["layers"],
        num_heads=size["heads"],
        hidden_size=size["hidden"],
    )
    tokens_per_step = plan.global_batch_size * size["context"]

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

    # -- baseline: plain DDP --------------------------------------------------------------
    def baseline() -> tuple[float, int]:
        torch.manual_seed(spec.hyperparameters.seed)
        model = make_model().to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if on_gpu else None
        )
        optimizer = torch.optim.AdamW(
            param_groups(model, spec.hyperparameters.weight_decay), lr=3e-4, betas=(0.9, 0.95)
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        start = time.perf_counter()
        for step in range(steps):
            if step == args.warmup:
                if on_gpu:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            positions = rank_positions(
                step * plan.global_batch_size, plan.global_batch_size, world, rank
            )
            inputs, labels = make_batch(windows, [order.index(p) for p in positions], objective)
            with autocast:
                loss = lm_loss(ddp(inputs.to(device)), labels.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # what a logging loop does every step
        if on_gpu:
            torch.cuda.synchronize()
        tokens_per_second = args.steps * tokens_per_step / (time.perf_counter() - start)
        parameters = model.num_parameters()
        del ddp, model, optimizer
        if on_gpu:
            torch.cuda.empty_cache()
        return tokens_per_second, parameters

    # -- ours: the trainer as a pod runs it ----------------------------------------------
    peak = args.peak_flops or peak_flops(device) or measured_peak(device)
    os.environ["LLMOPS_PEAK_FLOPS"] = str(peak)
    os.environ["LLMOPS_LOG_INTERVAL"] = str(args.warmup)

    trained: dict[str, int] = {}

    def ours() -> float:
        with tempfile.TemporaryDirectory() as out:
            paths = Paths(
                data=args.data,
                checkpoints=Path(out) / "ckpt",
                output=Path(out),
                init=None,
                pretrained=None if pretrained is None else Path(pretrained),
            )
            trainer = Trainer(run, paths)
            trainer.setup()
            trainer.train()
            history = [h for h in trainer.state.history if "tokensPerSecond" in h]
            module = trainer.engine.module
            trained["parameters"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
            trained["optimizerStateBytes"] = optimizer_state_bytes(trainer.engine.optimizer)
        # The trainer's own log windows after the first (warm-up) one, combined by time.
        lengths = [b["step"] - a["step"] for a, b in itertools.pairwise(history)]
        seconds = sum(
            n * tokens_per_step / h["tokensPerSecond"]
            for n, h in zip(lengths, history[1:], strict=True)
        )
        return sum(lengths) * tokens_per_step / seconds

    # Baseline before and after ours, averaged: a shared machine's load drifts.
    before, parameters = baseline()
    ours_tps = ours()
    after, _ = baseline()
    baseline_tps = (before + after) / 2

    if llama:
        shape = hf_models.Shape(
            "llama", size["layers"], size["hidden"], size["vocab"], size["context"]
        )
        flops = hf_models.flops_per_token(shape, parameters, size["context"], lora is not None)
    else:
        flops = flops_per_token(config, parameters)
    if rank == 0:
        result = {
            "machine": torch.cuda.get_device_name(device)
            if on_gpu
            else f"{os.cpu_count()} CPU cores",
            "processes": world,
            "precision": precision,
            "zeroStage": args.zero_stage,
            "model": ("llama" if llama else "gpt") + ("+lora" if lora else ""),
            "parameters": parameters,
            "trainedParameters": trained["parameters"],
            "optimizerStateBytesRank0": trained["optimizerStateBytes"],
            "tokensPerStep": tokens_per_step,
            "timedSteps": args.steps,
            "peakFlopsPerProcess": peak,
            "baselineDdpTokensPerSecond": round(baseline_tps, 1),
            "llmopsTokensPerSecond": round(ours_tps, 1),
            "ratio": round(ours_tps / baseline_tps, 3),
            "baselineMfu": round(baseline_tps * flops / (peak * world), 4),
            "llmopsMfu": round(ours_tps * flops / (peak * world), 4),
        }
        print(f"model: {parameters:,} parameters, {tokens_per_step} tokens/step, {precision}")
        ours = f"llmops ZeRO-{args.zero_stage}"
        print(f"{'plain DDP':15}: {baseline_tps:12.1f} tokens/s  MFU {result['baselineMfu']:.2%}")
        print(f"{ours:15}: {ours_tps:12.1f} tokens/s  MFU {result['llmopsMfu']:.2%}")
        print(f"ratio llmops / DDP: {result['ratio']:.3f}")
        print("RESULT " + json.dumps(result))
    dist.barrier()


def main() -> int:
    args = parse()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
