"""What a TrainingRun will cost before it runs: parameters, FLOPs, memory per GPU, time, money.

Pure functions of a validated `TrainingRunSpec` (no Kubernetes API, no torch), behind
`llmops plan -f MANIFEST`. Every number is an estimate from a stated formula:

- Parameters are counted from the shape exactly as the model code builds it: the built-in
  GPT (learned positions, LayerNorm, GELU MLP of 4h, biases, head tied to the embedding) and
  Llama-class models (RoPE, RMSNorm, SwiGLU of width i, grouped-query attention, no biases;
  Qwen2 adds q/k/v biases). A pretrained model is counted from its config.json when that is
  readable here (a local path, or `--model-config`); otherwise the planner refuses to guess.
- Training FLOPs per token = 6 N + 12 L h T for full training (2N forward and 4N backward
  for the weight matmuls, 12 L h T for attention scores, PaLM appendix B), with N the
  parameters minus position embeddings, as the trainer counts them for MFU. With LoRA the
  frozen base needs no weight gradients: 4 N_base + 6 N_adapter + 12 L h T.
- Memory per GPU: model states by ZeRO stage (`model_states`), activations of one
  micro-batch (`activation_bytes`) and a fixed runtime overhead per accelerator.
- Time = FLOPs / (accelerators x peak FLOP/s x MFU); accelerator-hours = time x GPUs (pods
  for a CPU gang, as `status.acceleratorHours` counts them); cost = hours x price.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from llmops.api.dataset import Dataset, DatasetSpec
from llmops.api.trainingrun import TrainingRun, TrainingRunSpec

GiB = 1 << 30
DEFAULT_MFU = 0.4
DEFAULT_ACCELERATOR = "h100"
# Bytes Adam keeps per trained parameter besides the weights: with mixed precision an fp32
# master copy and two fp32 moments; in fp32 the weights are the master, so only the moments.
ADAM_MIXED = 12
ADAM_FP32 = 8
# DeepSpeed's mixed-precision ZeRO optimizers also keep the gradients in fp32 for the step.
FP32_GRADIENT = 4


@dataclass(frozen=True)
class Accelerator:
    """One accelerator type: what the time and memory estimates assume of it."""

    name: str
    label: str
    peak_flops: float | None  # dense bf16/fp16 FLOP/s; None: give --peak-flops (CPUs)
    memory_bytes: int | None  # None: the pod's memory limit over its processes (CPUs)
    # CUDA context, NCCL and DeepSpeed's communication buckets, allocator slack: a rough
    # constant, so that a plan needing exactly the card's memory is not called a fit.
    overhead_bytes: int


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator("h200", "H200", 989e12, 141 * GiB, 2 * GiB),
        Accelerator("h100", "H100 SXM", 989e12, 80 * GiB, 2 * GiB),
        Accelerator("a100-80gb", "A100 80GB", 312e12, 80 * GiB, 2 * GiB),
        Accelerator("a100", "A100 40GB", 312e12, 40 * GiB, 2 * GiB),
        Accelerator("l40s", "L40S", 362e12, 48 * GiB, 2 * GiB),
        Accelerator("a10g", "A10G", 125e12, 24 * GiB, 1 * GiB),
        Accelerator("l4", "L4", 121e12, 24 * GiB, 1 * GiB),
        Accelerator("t4", "T4", 65e12, 16 * GiB, 1 * GiB),
        # The Python, torch and DeepSpeed runtime of one training process.
        Accelerator("cpu", "CPU", None, None, 1 * GiB),
    )
}

# Node labels that name the GPU product: GPU feature discovery, GKE, Karpenter on EKS.
GPU_LABELS = (
    "nvidia.com/gpu.product",
    "cloud.google.com/gke-accelerator",
    "karpenter.k8s.aws/instance-gpu-name",
)
# Substrings of those label values, most specific first ("l40s" before "l4").
PRODUCT_PATTERNS = (
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100-80", "a100-80gb"),
    ("a100-sxm4-80", "a100-80gb"),
    ("a100-pcie-80", "a100-80gb"),
    ("a100", "a100"),
    ("l40s", "l40s"),
    ("a10g", "a10g"),
    ("l4", "l4"),
    ("t4", "t4"),
)


class PlanError(ValueError):
    """The spec cannot be planned (e.g. an unknown model shape); the message says what to give."""


@dataclass(frozen=True)
class Linear:
    """A linear layer of a transformer block, by the name LoRA's targetModules use."""

    name: str
    inputs: int
    outputs: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What parameter, FLOP and activation counts need to know of a model."""

    family: Literal["gpt", "llama"]  # gpt: the built-in GPT and GPT-2; llama: Llama-class
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int  # learned position embeddings (0 with RoPE)
    tied: bool  # the output head is the token embedding
    qkv_bias: bool = False  # Qwen2's q/k/v projections have biases
    bias: bool = True  # gpt: biases in every linear layer and LayerNorm
    dropout: float = 0.0

    def linears(self) -> list[Linear]:
        """The linear layers of one block."""
        h, i = self.hidden, self.intermediate
        if self.family == "gpt":
            return [
                Linear("c_attn", h, 3 * h, self.bias),
                Linear("c_proj", h, h, self.bias),
                Linear("c_fc", h, i, self.bias),
                Linear("c_proj", i, h, self.bias),
            ]
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [
            Linear("q_proj", h, q, self.qkv_bias),
            Linear("k_proj", h, kv, self.qkv_bias),
            Linear("v_proj", h, kv, self.qkv_bias),
            Linear("o_proj", q, h, False),
            Linear("gate_proj", h, i, False),
            Linear("up_proj", h, i, False),
            Linear("down_proj", i, h, False),
        ]

    @property
    def norm_parameters(self) -> int:
        # LayerNorm has a weight and a bias (unless built without), RMSNorm a weight only.
        return (2 if self.family == "gpt" and self.bias else 1) * self.hidden

    def layer_parameters(self) -> int:
        linear = sum(x.inputs * x.outputs + (x.outputs if x.bias else 0) for x in self.linears())
        return linear + 2 * self.norm_parameters

    def parameters(self) -> int:
        """All parameters, a tied head counted once (as `sum(p.numel())` counts them)."""
        embeddings = (self.vocab + self.positions) * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return embeddings + self.layers * self.layer_parameters() + self.norm_parameters + head

    def largest_module(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once)."""
        linear = max(x.inputs * x.outputs + (x.outputs if x.bias else 0) for x in self.linears())
        return max(linear, self.vocab * self.hidden, self.positions * self.hidden)

    def lora_parameters(self, rank: int, targets: list[str]) -> tuple[int, list[str]]:
        """(adapter parameters, target names matching no layer). Each adapted linear layer
        gets A (rank x in) and B (out x rank); no targets means every linear layer of the
        blocks (peft's `all-linear`, which leaves the output head out)."""
        layers = self.linears()
        names = {x.name for x in layers}
        chosen = [x for x in layers if not targets or x.name in targets]
        per_layer = sum(rank * (x.inputs + x.outputs) for x in chosen)
        return self.layers * per_layer, [t for t in targets if t not in names]


def builtin_shape(spec: TrainingRunSpec, vocab: int) -> ModelShape:
    """The model the trainer builds from the spec's fields (architecture gpt or llama)."""
    m = spec.model
    if m.architecture == "gpt":
        # masked-lm adds the mask token to the vocabulary (llmops_trainer.batches.Objective).
        vocab = vocab + 1 if m.objective == "masked-lm" else vocab
        return ModelShape(
            family="gpt",
            layers=m.num_layers,
            hidden=m.hidden_size,
            heads=m.num_heads,
            kv_heads=m.num_heads,
            head_dim=m.hidden_size // m.num_heads,
            intermediate=4 * m.hidden_size,
            vocab=vocab,
            positions=m.context_length,
            tied=True,
            dropout=m.dropout,
            bias=m.with_biases,
        )
    # Llama's 8/3 expansion, rounded up to a multiple of 64 (llmops_trainer.hf_models).
    intermediate = m.intermediate_size or 64 * -(-(8 * m.hidden_size // 3) // 64)
    return ModelShape(
        family="llama",
        layers=m.num_layers,
        hidden=m.hidden_size,
        heads=m.num_heads,
        kv_heads=m.num_key_value_heads or m.num_heads,
        head_dim=m.hidden_size // m.num_heads,
        intermediate=intermediate,
        vocab=vocab,
        positions=0,
        tied=False,
        dropout=m.dropout,
    )


LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3"}


def shape_from_config(config: Mapping[str, Any], dropout: float = 0.0) -> ModelShape:
    """The shape of a Hugging Face model from its config.json (Llama-class or GPT-2)."""
    kind = str(config.get("model_type", ""))
    try:
        if kind == "gpt2":
            hidden = int(config["n_embd"])
            return ModelShape(
                family="gpt",
                layers=int(config["n_layer"]),
                hidden=hidden,
                heads=int(config["n_head"]),
                kv_heads=int(config["n_head"]),
                head_dim=hidden // int(config["n_head"]),
                intermediate=int(config.get("n_inner") or 4 * hidden),
                vocab=int(config["vocab_size"]),
                positions=int(config["n_positions"]),
                tied=bool(config.get("tie_word_embeddings", True)),
                dropout=dropout,
            )
        if kind in LLAMA_LIKE:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return ModelShape(
                family="llama",
                layers=int(config["num_hidden_layers"]),
                hidden=hidden,
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                positions=0,
                tied=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
                dropout=dropout,
            )
    except (KeyError, TypeError, ValueError) as error:
        raise PlanError(f"config.json of model_type {kind!r} lacks {error}") from error
    raise PlanError(
        f"parameter count unknown for model_type {kind!r} (the planner knows "
        f"gpt2, {', '.join(sorted(LLAMA_LIKE))}); give the model shape instead"
    )


def pretrained_shape(
    spec: TrainingRunSpec, model_config: Path | None, local_paths: bool = True
) -> ModelShape:
    """The shape of `model.pretrained` from its config.json: `model_config` when given, else
    the model's folder when its URI is a path readable on this machine (and `local_paths`:
    the operator's disk is not the pods')."""
    assert spec.model.pretrained is not None
    uri = spec.model.pretrained.uri
    path = model_config
    if path is None and uri.startswith("/") and local_paths:
        path = Path(uri) / "config.json"
    if path is None or not path.is_file():
        where = f"{path} is not readable here" if path else f"{uri} is not a local path"
        raise PlanError(
            f"model.pretrained: parameter count unknown ({where}); give the model shape: "
            "--model-config path/to/config.json (only that file of the model is needed)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PlanError(f"{path}: not a readable config.json: {error}") from error
    return shape_from_config(config, spec.model.dropout)


def dataset_vocab(dataset: DatasetSpec) -> int | None:
    """The vocabulary a Dataset's tokenizer will have, when the spec alone fixes it."""
    tokenizer = dataset.tokenizer
    if tokenizer.train is not None:
        return tokenizer.train.vocab_size
    if tokenizer.byte is not None:
        return 256 + len(tokenizer.byte.special_tokens)
    return None  # char, path, datasetRef, fromModel: known only once built


# -- memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    """Bytes of parameters, gradients and optimizer state on one GPU and offloaded to the
    CPU memory of one process."""

    parameters: float
    gradients: float
    optimizer: float
    offloaded: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def model_states(
    parameters: int,
    trainable: int,
    largest_module: int,
    zero_stage: int,
    precision: str,
    data_parallel: int,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
) -> ModelStates:
    """Model-state bytes per GPU under ZeRO at the optimizer step (their peak).

    With weights of e bytes (2 in bf16/fp16, 4 in fp32), N parameters, T of them trained and
    data-parallel size d:

    - weights: e N; ZeRO-3 shards them (e N / d) and gathers one module at a time (its
      weights and gradients: 2 e x the largest module);
    - gradients: e T in the weights' precision, plus with mixed precision 4 T for the fp32
      gradients DeepSpeed's optimizer steps on; ZeRO-1 shards the fp32 ones, ZeRO-2/3 all;
    - optimizer: Adam's fp32 master copy and two moments, 12 T (8 T in fp32, where the
      weights are the master); sharded from ZeRO-1 on.

    Offloading the optimizer moves it and the fp32 gradients to CPU memory, and from ZeRO-2
    on the 16-bit gradients too (reduced bucket by bucket into the CPU copy); offloading the
    parameters (ZeRO-3) leaves only the gathered module on the GPU.

    This is DeepSpeed's own accounting (`estimate_zero2_model_states_mem_needs`: 2 N + 18 N / d
    for ZeRO-1/2) except without offload at ZeRO-3, where its estimator counts 18 N / d and
    this 20 N / d: a ZeRO-3 engine keeps a 16-bit gradient partition besides the 16-bit
    weights, fp32 master and moments (16 bytes measured after a step) and makes the fp32
    gradients of each sub-group during the step (4 more).
    """
    mixed = precision != "fp32"
    e = 2 if mixed else 4
    d = max(1, data_parallel)
    wide_grads = FP32_GRADIENT * trainable if mixed else 0
    adam = (ADAM_MIXED if mixed else ADAM_FP32) * trainable
    weights = e * parameters / d if zero_stage == 3 else float(e * parameters)
    grads = e * trainable / d if zero_stage >= 2 else float(e * trainable)
    wide = wide_grads / d if zero_stage >= 1 else float(wide_grads)
    optimizer = adam / d if zero_stage >= 1 else float(adam)
    offloaded = 0.0
    if offload_optimizer:
        offloaded += wide + optimizer
        wide = optimizer = 0.0
        if zero_stage >= 2:
            offloaded += grads
            grads = 0.0
    if offload_parameters:
        offloaded += weights
        weights = 0.0
    if zero_stage == 3:
        weights += 2 * e * largest_module
    return ModelStates(weights, grads + wide, optimizer, offloaded)


def uses_transformers(spec: TrainingRunSpec) -> bool:
    """True for models the trainer builds with `transformers` (they honour
    activationCheckpointing; the built-in GPT does not)."""
    return spec.model.pretrained is not None or spec.model.architecture == "llama"


def _norm_bytes(shape: ModelShape, e: int) -> int:
    """Bytes per token one norm keeps: LayerNorm its input; HF's RMSNorm computes in fp32
    and keeps the fp32 copy of its input."""
    return e * shape.hidden if shape.family == "gpt" else 4 * shape.hidden


def layer_activation_bytes(shape: ModelShape, e: int) -> int:
    """Bytes one block keeps for its backward pass, per token, with e-byte activations.

    The tensors saved for backward, counted as the code makes them. The start is Korthikanti
    et al. 2022's `s b h (34 + 5 a s / h)` bytes per layer in 16-bit (with dropout); the
    trainer's fused scaled_dot_product_attention keeps no s x s scores (no `5 a s / h`) but
    does keep its output besides the projection's input copy (2 more), and without dropout
    there are no masks (2 less):

    - GPT: 2 norm inputs, q/k/v input h, q/k/v 3h, attention output twice (kernel output and
      the projection's input) 2h, MLP input h, GELU input and output 2 x 4h: 17h elements,
      plus two 1-byte dropout masks of h when dropout > 0 (36 s b h in 16-bit, 34 without
      dropout);
    - Llama: 2 fp32 norm inputs (4h bytes each: HF's RMSNorm computes in fp32), q/k/v input
      h, q h, k and v 2 h_kv, attention output twice 2h, MLP input h, SwiGLU's gate,
      activation, up and product 4i elements.
    """
    h, i = shape.hidden, shape.intermediate
    norms = 2 * _norm_bytes(shape, e)
    if shape.family == "gpt":
        masks = 2 * h if shape.dropout > 0 else 0
        return norms + e * (7 * h + 2 * i) + masks
    kv = shape.kv_heads * shape.head_dim
    return norms + e * (5 * h + 2 * kv + 4 * i)


def activation_bytes(shape: ModelShape, e: int, tokens: int, checkpointing: bool) -> int:
    """Activation bytes of one micro-batch of `tokens` (micro-batch size x context).

    Without checkpointing every block keeps `layer_activation_bytes`; with it each block
    keeps only its input (e h per token) and one block at a time is recomputed in full. The
    output layer adds the final norm, the head's input and the logits: the logits in e
    bytes, their fp32 copy for the loss and the fp32 log-softmax the loss keeps (8 bytes per
    logit in fp32, where the copy is the logits themselves). The gradients' transient
    buffers during the backward pass are not counted.
    """
    layer = layer_activation_bytes(shape, e)
    body = shape.layers * (e * shape.hidden) + layer if checkpointing else shape.layers * layer
    logits = shape.vocab * ((e + 8) if e < 4 else 8)
    head = _norm_bytes(shape, e) + e * shape.hidden + logits
    return tokens * (body + head)


# -- accelerators ------------------------------------------------------------------------


def accelerator_from_selector(selector: Mapping[str, str]) -> Accelerator | None:
    """The accelerator a node selector asks for by its GPU product label, if it does."""
    for label in GPU_LABELS:
        value = selector.get(label, "").lower()
        for pattern, name in PRODUCT_PATTERNS:
            if value and pattern in value:
                return ACCELERATORS[name]
    return None


def choose_accelerator(spec: TrainingRunSpec, name: str | None) -> Accelerator:
    """`name` when given; else the node selector's GPU product; else a CPU for a gang
    without GPUs; else the default (an H100)."""
    if name is not None:
        try:
            return ACCELERATORS[name.lower()]
        except KeyError:
            known = ", ".join(ACCELERATORS)
            raise PlanError(f"unknown accelerator {name!r} (known: {known})") from None
    found = accelerator_from_selector(spec.scheduling.node_selector)
    if found is not None:
        return found
    if spec.resources.gpus_per_node == 0:
        return ACCELERATORS["cpu"]
    return ACCELERATORS[DEFAULT_ACCELERATOR]


_SUFFIXES: dict[str, float] = {
    **{s + "i": 1024 ** (n + 1) for n, s in enumerate("KMGTPE")},
    **{s: 1000 ** (n + 1) for n, s in enumerate("kMGTPE")},
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
    "": 1,
}


def quantity_bytes(quantity: str) -> float:
    """A resource.Quantity ("480Gi", "64G", "1e9") in bytes."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([KMGTPE]i|[kMGTPEmun])?", quantity)
    if match is None:
        raise PlanError(f"not a memory quantity: {quantity!r}")
    suffix: str = match.group(2) or ""
    return float(match.group(1)) * _SUFFIXES[suffix]


# -- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanOptions:
    """What `llmops plan` may be told besides the spec."""

    accelerator: str | None = None  # None: from the node selector, else cpu or h100
    mfu: float = DEFAULT_MFU
    peak_flops: float | None = None  # per accelerator (per process on CPUs)
    price_per_hour: float | None = None  # per accelerator-hour; wins over `prices`
    prices: Mapping[str, float] = field(default_factory=dict)  # accelerator name -> price
    vocab_size: int | None = None  # wins over the Dataset's
    model_config: Path | None = None  # config.json of a model.pretrained not readable here
    local_paths: bool = True  # read a local model.pretrained path's config.json (CLI only)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (per process on CPUs), and what is offloaded to CPU memory."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    capacity: float | None  # None: unknown (a CPU pod without a memory limit)
    offloaded_per_pod: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.overhead


@dataclass(frozen=True)
class Plan:
    """The estimate for one TrainingRun; `summary()` fits a condition message."""

    name: str
    model: str
    accelerator: Accelerator
    world_size: int  # training processes (one per GPU)
    billed: int  # accelerators billed per hour: GPUs, or pods for a CPU gang
    zero_stage: int
    precision: str
    parameters: int
    trainable_parameters: int
    tokens_per_step: int
    steps: int
    flops_per_token: float
    memory: Memory
    mfu: float
    peak_flops: float | None
    seconds: float | None  # None without a peak FLOP/s (a CPU without --peak-flops)
    price_per_hour: float | None
    fits: bool
    warnings: list[str]

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def training_flops(self) -> float:
        return self.flops_per_token * self.total_tokens

    @property
    def unit(self) -> str:
        return "pod" if self.accelerator.name == "cpu" else "GPU"

    @property
    def accelerator_hours(self) -> float | None:
        return None if self.seconds is None else self.seconds / 3600 * self.billed

    @property
    def cost(self) -> float | None:
        hours = self.accelerator_hours
        return None if hours is None or self.price_per_hour is None else hours * self.price_per_hour

    def summary(self) -> str:
        """One line of the key numbers (a Kubernetes condition message, under 400 chars)."""
        m = self.memory
        capacity = f" of {gib(m.capacity)}" if m.capacity is not None else ""
        parts = [
            f"{count(self.parameters)} parameters ({count(self.trainable_parameters)} trained)",
            f"{count(self.total_tokens)} tokens in {self.steps:,} steps, "
            f"{self.training_flops:.2g} FLOPs",
            f"ZeRO-{self.zero_stage} {self.precision} needs {gib(m.total)}{capacity} per "
            f"{self.accelerator.label}",
        ]
        if self.seconds is not None and self.accelerator_hours is not None:
            time = f"~{duration(self.seconds)} on {self.world_size} {self.accelerator.label}"
            time += f" at MFU {self.mfu:.2f} = {self.accelerator_hours:,.1f} {self.unit}-h"
            if self.cost is not None:
                time += f", ${self.cost:,.0f}"
            parts.append(time)
        parts.append("fits" if self.fits else "does not fit")
        line = "; ".join(parts)
        return line if len(line) <= 400 else line[:397] + "..."

    def rows(self) -> list[tuple[str, str]]:
        """(quantity, value) pairs for a table."""
        m = self.memory
        hours = self.accelerator_hours
        rows = [
            ("model", self.model),
            ("parameters", f"{count(self.parameters)} ({self.parameters:,})"),
            ("trainable", f"{count(self.trainable_parameters)} ({self.trainable_parameters:,})"),
            ("tokens per step", f"{self.tokens_per_step:,}"),
            ("steps", f"{self.steps:,}"),
            ("total tokens", count(self.total_tokens)),
            ("FLOPs per token", f"{self.flops_per_token:.3g}"),
            ("training FLOPs", f"{self.training_flops:.3g}"),
            ("accelerator", f"{self.world_size} x {self.accelerator.label}"),
            ("ZeRO", f"stage {self.zero_stage}, {self.precision}"),
            ("parameters / GPU", gib(m.parameters)),
            ("gradients / GPU", gib(m.gradients)),
            ("optimizer / GPU", gib(m.optimizer)),
            ("activations / GPU", gib(m.activations)),
            ("runtime overhead", gib(m.overhead)),
            ("memory / GPU", gib(m.total) + (f" of {gib(m.capacity)}" if m.capacity else "")),
        ]
        if m.offloaded_per_pod:
            rows.append(("offloaded / pod", gib(m.offloaded_per_pod)))
        peak = (
            "unknown (give --peak-flops)" if self.peak_flops is None else f"{self.peak_flops:.3g}"
        )
        rows += [("peak FLOP/s", peak), ("MFU", f"{self.mfu:.2f}")]
        if self.seconds is not None and hours is not None:
            rows += [("time", duration(self.seconds)), (f"{self.unit}-hours", f"{hours:,.1f}")]
        if self.cost is not None:
            rows.append(("cost", f"${self.cost:,.2f}"))
        rows.append(("fits", "yes" if self.fits else "no"))
        rows += [("warning", w) for w in self.warnings]
        return rows

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON (bytes, seconds, FLOPs)."""
        memory = asdict(self.memory) | {"total": self.memory.total}
        return {
            "name": self.name,
            "model": self.model,
            "accelerator": self.accelerator.name,
            "worldSize": self.world_size,
            "zeroStage": self.zero_stage,
            "precision": self.precision,
            "parameters": self.parameters,
            "trainableParameters": self.trainable_parameters,
            "tokensPerStep": self.tokens_per_step,
            "steps": self.steps,
            "totalTokens": self.total_tokens,
            "flopsPerToken": self.flops_per_token,
            "trainingFlops": self.training_flops,
            "memoryBytes": {to_camel(k): v for k, v in memory.items()},
            "mfu": self.mfu,
            "peakFlops": self.peak_flops,
            "seconds": self.seconds,
            "acceleratorHours": self.accelerator_hours,
            "pricePerHour": self.price_per_hour,
            "cost": self.cost,
            "fits": self.fits,
            "warnings": list(self.warnings),
            "summary": self.summary(),
        }


def count(n: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:.0f}"


def gib(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


def duration(seconds: float) -> str:
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _shape(spec: TrainingRunSpec, options: PlanOptions, dataset: DatasetSpec | None) -> ModelShape:
    if spec.model.pretrained is not None:
        return pretrained_shape(spec, options.model_config, options.local_paths)
    vocab = options.vocab_size or (dataset_vocab(dataset) if dataset is not None else None)
    if vocab is None:
        raise PlanError(
            f"the vocabulary size of Dataset {spec.dataset_ref.name!r} is not fixed by its "
            "spec (or the Dataset is not in the file): give --vocab-size"
        )
    return builtin_shape(spec, vocab)


def _batch(spec: TrainingRunSpec) -> tuple[int, int]:
    """(sequences per optimizer step over all processes, optimizer steps); the trainer's
    batch plan (llmops_trainer.plan) for the spec's own world size."""
    hp = spec.hyperparameters
    world = spec.resources.num_nodes * spec.resources.processes_per_node
    per_step = (
        hp.global_batch_size or hp.micro_batch_size * (hp.gradient_accumulation_steps or 1) * world
    )
    if hp.max_steps is not None:
        return per_step, hp.max_steps
    assert hp.max_tokens is not None  # the API guarantees exactly one of the two
    return per_step, max(1, math.ceil(hp.max_tokens / (per_step * spec.model.context_length)))


def _flops_per_token(shape: ModelShape, trainable: int, adapter: bool, context: int) -> float:
    """6 N + 12 L h T, or with LoRA 4 N_base + 6 N_adapter + 12 L h T (module docstring)."""
    base = shape.parameters() - shape.positions * shape.hidden
    attention = 12.0 * shape.layers * shape.hidden * context
    if adapter:
        return 4.0 * base + 6.0 * trainable + attention
    return 6.0 * base + attention


def _recompute_factor(shape: ModelShape, flops_per_token: float, context: int) -> float:
    """Executed over model FLOPs with activation checkpointing: one more forward pass (2N
    for the weights, 4 L h T for attention). MFU, by definition, does not count it."""
    base = shape.parameters() - shape.positions * shape.hidden
    forward = 2.0 * base + 4.0 * shape.layers * shape.hidden * context
    return (flops_per_token + forward) / flops_per_token


def _memory(
    spec: TrainingRunSpec,
    shape: ModelShape,
    trainable: int,
    accelerator: Accelerator,
    checkpointing: bool,
) -> Memory:
    ds, res = spec.deepspeed, spec.resources
    world = res.num_nodes * res.processes_per_node
    states = model_states(
        shape.parameters(),
        trainable,
        shape.largest_module(),
        ds.zero_stage,
        ds.precision,
        world,
        offload_optimizer=ds.offload_optimizer == "cpu",
        offload_parameters=ds.offload_parameters == "cpu",
    )
    e = 4 if ds.precision == "fp32" else 2
    tokens = spec.hyperparameters.micro_batch_size * spec.model.context_length
    capacity: float | None = accelerator.memory_bytes
    if capacity is None and res.memory is not None:
        capacity = quantity_bytes(res.memory) / res.processes_per_node
    return Memory(
        parameters=states.parameters,
        gradients=states.gradients,
        optimizer=states.optimizer,
        activations=float(activation_bytes(shape, e, tokens, checkpointing)),
        overhead=float(accelerator.overhead_bytes),
        capacity=capacity,
        offloaded_per_pod=states.offloaded * res.processes_per_node,
    )


def _remedies(spec: TrainingRunSpec, memory: Memory, checkpointing: bool) -> list[str]:
    ds = spec.deepspeed
    remedies = []
    if ds.zero_stage < 3:
        remedies.append("zeroStage 3")
    if ds.offload_optimizer == "none" and ds.zero_stage >= 1:
        remedies.append("offloadOptimizer cpu")
    elif ds.zero_stage == 3 and ds.offload_parameters == "none":
        remedies.append("offloadParameters cpu")
    if not checkpointing and uses_transformers(spec):
        remedies.append("activation checkpointing")
    if memory.activations > memory.total / 4 and spec.hyperparameters.micro_batch_size > 1:
        remedies.append("a smaller microBatchSize")
    if ds.zero_stage >= 1:
        remedies.append("more GPUs")
    return remedies


def _fit_problems(
    spec: TrainingRunSpec, memory: Memory, plan_label: str, checkpointing: bool
) -> list[str]:
    problems = []
    if memory.capacity is not None and memory.total > memory.capacity:
        ds = spec.deepspeed
        remedies = _remedies(spec, memory, checkpointing)
        how = ", ".join(remedies[:-1]) + (" or " if len(remedies) > 1 else "") + remedies[-1]
        problems.append(
            f"needs ~{memory.total / GiB:.0f} GiB per GPU for ZeRO-{ds.zero_stage} "
            f"{ds.precision} (params {memory.parameters / GiB:.1f}, grads "
            f"{memory.gradients / GiB:.1f}, optimizer {memory.optimizer / GiB:.1f}, "
            f"activations {memory.activations / GiB:.1f}) but the {plan_label} has "
            f"{memory.capacity / GiB:.0f} GiB: use {how}"
        )
    pod = spec.resources.memory
    if (
        memory.offloaded_per_pod
        and pod is not None
        and memory.offloaded_per_pod > quantity_bytes(pod)
    ):
        problems.append(
            f"offloaded states need ~{memory.offloaded_per_pod / GiB:.0f} GiB of CPU memory per "
            f"pod but resources.memory is {pod}"
        )
    return problems


def plan(
    spec: TrainingRunSpec,
    options: PlanOptions | None = None,
    dataset: DatasetSpec | None = None,
    name: str = "",
) -> Plan:
    """The estimate for a validated spec; `dataset` (its Dataset) may fix the vocabulary.
    Raises PlanError when the model's size cannot be known."""
    options = options or PlanOptions()
    shape = _shape(spec, options, dataset)
    accelerator = choose_accelerator(spec, options.accelerator)
    warnings: list[str] = []
    trainable = shape.parameters()
    if spec.adapter is not None:
        trainable, unmatched = shape.lora_parameters(spec.adapter.rank, spec.adapter.target_modules)
        if unmatched:
            warnings.append(f"adapter.targetModules {unmatched} match no linear layer")
    checkpointing = spec.deepspeed.activation_checkpointing and uses_transformers(spec)
    if spec.deepspeed.activation_checkpointing and not checkpointing:
        warnings.append("activationCheckpointing has no effect on the built-in gpt architecture")
    context = spec.model.context_length
    sequences, steps = _batch(spec)
    flops = _flops_per_token(shape, trainable, spec.adapter is not None, context)
    memory = _memory(spec, shape, trainable, accelerator, checkpointing)

    res = spec.resources
    world = res.num_nodes * res.processes_per_node
    if accelerator.name != "cpu" and res.gpus_per_node == 0:
        warnings.append(
            f"resources.gpusPerNode is 0: the run trains on CPUs, not {accelerator.label}"
        )
    if memory.capacity is None:
        warnings.append("no memory limit per process known (set resources.memory): fit not checked")
    problems = _fit_problems(spec, memory, accelerator.label, checkpointing)

    peak = options.peak_flops or accelerator.peak_flops
    seconds = None
    if peak is None:
        warnings.append(f"no peak FLOP/s for {accelerator.label}: give --peak-flops for a time")
    else:
        executed = _recompute_factor(shape, flops, context) if checkpointing else 1.0
        seconds = flops * steps * sequences * context * executed / (world * peak * options.mfu)
    billed = res.num_nodes if accelerator.name == "cpu" else world
    price = options.price_per_hour
    if price is None:
        price = options.prices.get(accelerator.name)
    result = Plan(
        name=name,
        model=_describe(spec, shape),
        accelerator=accelerator,
        world_size=world,
        billed=billed,
        zero_stage=spec.deepspeed.zero_stage,
        precision=spec.deepspeed.precision,
        parameters=shape.parameters(),
        trainable_parameters=trainable,
        tokens_per_step=sequences * context,
        steps=steps,
        flops_per_token=flops,
        memory=memory,
        mfu=options.mfu,
        peak_flops=peak,
        seconds=seconds,
        price_per_hour=price,
        fits=not problems,
        warnings=problems + warnings,
    )
    return _with_budget_warning(spec, result)


def _describe(spec: TrainingRunSpec, shape: ModelShape) -> str:
    source = spec.model.pretrained.uri if spec.model.pretrained else spec.model.architecture
    text = f"{source}: {shape.layers} layers x {shape.hidden}, vocab {shape.vocab:,}"
    if spec.adapter is not None:
        text += f", LoRA rank {spec.adapter.rank}"
    return text


def _with_budget_warning(spec: TrainingRunSpec, result: Plan) -> Plan:
    """Warn when spec.budget would stop the run before its last step."""
    budget, hours = spec.budget, result.accelerator_hours
    problems = []
    if budget and budget.max_accelerator_hours and hours and hours > budget.max_accelerator_hours:
        share = budget.max_accelerator_hours / hours
        problems.append(
            f"budget.maxAcceleratorHours {budget.max_accelerator_hours:g} stops the run after "
            f"~{share:.0%} of its steps (needs ~{hours:,.1f})"
        )
    seconds = result.seconds
    if (
        budget
        and budget.max_wall_time_seconds
        and seconds
        and seconds > budget.max_wall_time_seconds
    ):
        share = budget.max_wall_time_seconds / seconds
        problems.append(
            f"budget.maxWallTimeSeconds {budget.max_wall_time_seconds} stops the run after "
            f"~{share:.0%} of its steps"
        )
    if not problems:
        return result
    return Plan(**{**result.__dict__, "warnings": [*result.warnings, *problems]})


# -- manifests ---------------------------------------------------------------------------


class InvalidManifest(PlanError):
    """A manifest the API server would reject; the message names the field."""


def _validation_errors(where: str, error: ValidationError) -> InvalidManifest:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        lines.append(f"{where}: {path}: {item['msg']}" if path else f"{where}: {item['msg']}")
    return InvalidManifest("\n".join(lines))


def _key(doc: Mapping[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    return str(meta.get("namespace") or "default"), str(meta.get("name", "<no name>"))


def plan_documents(documents: list[dict[str, Any]], options: PlanOptions) -> list[Plan]:
    """A plan for every TrainingRun among `documents` (other kinds are skipped; a Dataset
    among them may fix a run's vocabulary). Raises InvalidManifest or PlanError."""
    datasets: dict[tuple[str, str], DatasetSpec] = {}
    runs: list[tuple[str, TrainingRun]] = []
    fields = ("apiVersion", "kind", "metadata", "spec")
    for doc in documents:
        kind = doc.get("kind")
        if kind not in ("Dataset", "TrainingRun"):
            continue
        where = f"{kind}/{_key(doc)[1]}"
        try:
            if kind == "Dataset":
                parsed = Dataset.model_validate({k: doc[k] for k in fields if k in doc})
                datasets[_key(doc)] = parsed.spec
            else:
                run = TrainingRun.model_validate({k: doc[k] for k in fields if k in doc})
                runs.append((where, run))
        except ValidationError as error:
            raise _validation_errors(where, error) from None
    plans = []
    for where, run in runs:
        namespace = run.metadata.namespace or "default"
        dataset = datasets.get((namespace, run.spec.dataset_ref.name))
        try:
            plans.append(plan(run.spec, options, dataset, run.metadata.name))
        except PlanError as error:
            raise PlanError(f"{where}: {error}") from None
    return plans
