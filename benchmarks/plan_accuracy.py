"""How close `llmops plan` comes to a real training run: memory and time, on this machine.

For a few small built-in GPT shapes, each in a fresh process (one rank, DeepSpeed on the
CPU, fp32, ZeRO-0), the trainer exactly as a pod runs it (`llmops_trainer.train.Trainer`)
trains a few steps on random tokens; the worker reports

- the baseline resident memory after importing torch, DeepSpeed and the trainer and
  initializing the process group (what the plan's runtime overhead stands for), and the
  peak resident memory (VmHWM) after training: the difference is what the model states and
  activations took;
- seconds per optimizer step after a warm-up window (the trainer's own tokens/s log);
- this process's fp32 matmul FLOP/s (a 1024 x 1024 matmul), the baseline peak.

The plan is made for the same spec with `--accelerator cpu --peak-flops <measured>` and
the default MFU (0.4). Printed ratios are estimate / measured: memory compares the plan's
model states + activations with the peak RSS less the baseline, time the plan's seconds per
step with the measured ones (the ratio is measured MFU / 0.4 when the FLOP count is right).

    python benchmarks/plan_accuracy.py            # 3 shapes, about 1 minute each on 2 cores
    python benchmarks/plan_accuracy.py --shapes s1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# (layers, width, heads, context, micro-batch, vocabulary): sized so that model states and
# activations are hundreds of MiB (well above RSS noise) and a step takes about a second.
SHAPES: dict[str, dict[str, int]] = {
    "s1": {"layers": 4, "hidden": 256, "heads": 4, "context": 256, "micro": 4, "vocab": 4096},
    "s2": {"layers": 2, "hidden": 512, "heads": 8, "context": 256, "micro": 4, "vocab": 8192},
    "s3": {"layers": 6, "hidden": 192, "heads": 6, "context": 512, "micro": 2, "vocab": 2048},
}
# A model of almost nothing, trained the same way: its RSS growth is the runtime's own
# (DeepSpeed's engine and communication ops, thread pools, allocator arenas), subtracted
# from every shape's.
FIXED = {"layers": 1, "hidden": 32, "heads": 2, "context": 32, "micro": 1, "vocab": 256}
STEPS = 8
LOG_INTERVAL = 2  # the first window is the warm-up


def run_spec(size: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "llmops.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": "plan-accuracy"},
        "spec": {
            "datasetRef": {"name": "bench"},
            "model": {
                "numLayers": size["layers"],
                "numHeads": size["heads"],
                "hiddenSize": size["hidden"],
                "contextLength": size["context"],
            },
            "hyperparameters": {
                "maxSteps": STEPS,
                "microBatchSize": size["micro"],
                "schedule": "constant",
            },
            "deepspeed": {"zeroStage": 0, "precision": "fp32"},
            "resources": {"procsPerNode": 1},
            "checkpointing": {"intervalSteps": 10**8},
            "evaluation": {"intervalSteps": 10**8},
        },
    }


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def best_peak(device: Any) -> float:
    """The best of a few matmul measurements: on a shared machine one may be interrupted."""
    from train_throughput import measured_peak

    return max(measured_peak(device) for _ in range(5))


def worker(shape: str, data: Path) -> None:
    """One training run; prints a RESULT line of JSON."""
    import deepspeed
    import torch

    from llmops.api.trainingrun import TrainingRun
    from llmops_trainer.train import Paths, Trainer

    size = SHAPES.get(shape, FIXED)
    deepspeed.init_distributed(dist_backend="gloo")
    peak = best_peak(torch.device("cpu"))
    run = TrainingRun.model_validate(run_spec(size))
    with tempfile.TemporaryDirectory() as out:
        paths = Paths(data, Path(out) / "ckpt", Path(out), init=None)
        baseline = rss_bytes("VmRSS")
        trainer = Trainer(run, paths)
        trainer.setup()
        after_setup = rss_bytes("VmRSS")
        trainer.train()
        peak_rss = rss_bytes("VmHWM")
    history = [h for h in trainer.state.history if "tokensPerSecond" in h]
    tokens_per_step = size["micro"] * size["context"]
    # Windows after the first (warm-up), combined by time.
    timed = history[1:]
    seconds = sum(LOG_INTERVAL * tokens_per_step / h["tokensPerSecond"] for h in timed)
    result = {
        "baselineRss": baseline,
        "setupRss": after_setup,
        "peakRss": peak_rss,
        "secondsPerStep": seconds / (LOG_INTERVAL * len(timed)),
        "peakFlops": peak,
    }
    print("RESULT " + json.dumps(result), flush=True)


def measure(shape: str, data: Path) -> dict[str, Any]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LLMOPS_METRICS_PORT": "0",
        "LLMOPS_LOG_INTERVAL": str(LOG_INTERVAL),
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    }
    argv = [sys.executable, __file__, "--worker", shape, f"--data={data}"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
            return result
    raise RuntimeError(f"{shape}: the worker failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


def compare(shape: str, measured: dict[str, Any], fixed: int) -> dict[str, Any]:
    from llmops.api.trainingrun import TrainingRun
    from llmops.plan import PlanOptions, plan

    size = SHAPES[shape]
    spec = TrainingRun.model_validate(run_spec(size)).spec
    options = PlanOptions(
        accelerator="cpu", peak_flops=measured["peakFlops"], vocab_size=size["vocab"]
    )
    estimate = plan(spec, options)
    m = estimate.memory
    estimated_bytes = m.parameters + m.gradients + m.optimizer + m.activations
    used = measured["peakRss"] - measured["baselineRss"] - fixed
    assert estimate.seconds is not None
    per_step = estimate.seconds / estimate.steps
    return {
        "shape": shape,
        "parameters": estimate.parameters,
        "estimateMiB": estimated_bytes / 2**20,
        "measuredMiB": used / 2**20,
        "memoryRatio": estimated_bytes / used,
        "overheadEstimateMiB": m.overhead / 2**20,
        "baselineRssMiB": measured["baselineRss"] / 2**20,
        "fixedMiB": fixed / 2**20,
        "setupGrowthMiB": (measured["setupRss"] - measured["baselineRss"]) / 2**20,
        "statesMiB": (m.parameters + m.gradients + m.optimizer) / 2**20,
        "activationsMiB": m.activations / 2**20,
        "estimateSecondsPerStep": per_step,
        "measuredSecondsPerStep": measured["secondsPerStep"],
        "timeRatio": per_step / measured["secondsPerStep"],
        "measuredMfu": estimate.flops_per_token
        * estimate.tokens_per_step
        / measured["secondsPerStep"]
        / measured["peakFlops"],
        "peakFlops": measured["peakFlops"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--worker", choices=[*sorted(SHAPES), "fixed"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data)
        return 0
    from train_throughput import write_data

    def run(shape: str) -> dict[str, Any]:
        size = SHAPES.get(shape, FIXED)
        with tempfile.TemporaryDirectory() as tmp:
            tokens = (STEPS + 2) * 2 * size["micro"] * (size["context"] + 1)
            write_data(Path(tmp), size, max(tokens, 1 << 16))
            return measure(shape, Path(tmp))

    baseline = run("fixed")
    fixed = baseline["peakRss"] - baseline["baselineRss"]
    rows = []
    for shape in args.shapes:
        start = time.perf_counter()
        measured = run(shape)
        row = compare(shape, measured, fixed)
        row["wallSeconds"] = time.perf_counter() - start
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    print(f"\n{os.cpu_count()} CPU cores, fp32, ZeRO-0, 1 process; ratio = estimate / measured")
    header = (
        f"{'shape':5} {'params':>11} {'mem est':>9} {'mem meas':>9} {'ratio':>6} "
        f"{'s/step est':>10} {'s/step meas':>11} {'ratio':>6} {'MFU':>5}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['shape']:5} {r['parameters']:>11,} {r['estimateMiB']:>6.0f}MiB "
            f"{r['measuredMiB']:>6.0f}MiB {r['memoryRatio']:>6.2f} "
            f"{r['estimateSecondsPerStep']:>10.3f} {r['measuredSecondsPerStep']:>11.3f} "
            f"{r['timeRatio']:>6.2f} {r['measuredMfu']:>5.2f}"
        )
    print(
        f"(memory: model states + activations vs peak RSS less the RSS after imports "
        f"({rows[0]['baselineRssMiB']:.0f} MiB) and less the growth of a run of a tiny model "
        f"({fixed / 2**20:.0f} MiB); time at the plan's default MFU 0.4 of the best measured "
        f"matmul FLOP/s, {rows[0]['peakFlops']:.3g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
