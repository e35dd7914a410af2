"""The serving container of a ModelDeployment with runtime vllm: vLLM's OpenAI-compatible
server (`vllm serve`) on the model folder, with the same port, model name, auth Secret,
volumes, security context and resources as the built-in server.

Only flags and environment variables of the pinned vLLM release are emitted;
tests/unit/test_vllm.py checks them against the list taken from that release's source
(tests/unit/vllm_interface.txt).
"""

from __future__ import annotations

from typing import Any

from llmops import config
from llmops.api.modeldeployment import ModelDeployment, ServingResources, VllmSettings
from llmops.config import VLLM_VERSION as VLLM_VERSION

DEFAULT_IMAGE = config.DEFAULT_VLLM_IMAGE  # the pin, where the operator's configuration has none
IMAGE_ENV = "LLMOPS_VLLM_IMAGE"  # the chart's `vllmImage`
# vLLM reads its API key from here (or --api-key, which would show the key in the pod spec).
API_KEY_ENV = "VLLM_API_KEY"
# Loading a large model across GPUs, compiling it and capturing CUDA graphs can take many
# minutes; the startup probe allows for it before liveness counts.
STARTUP_SECONDS = 1800
STARTUP_PERIOD = 10
HEALTH_PATH = "/health"  # 200 once the engine is up, 503 when it has died
# A writable home on the read-only root filesystem: vLLM, torch.compile, Triton and the
# Hugging Face libraries keep caches and configuration under it.
HOME = "/home/vllm"


def image(resources: ServingResources) -> str:
    """The spec's image, else the one the operator was configured with, else the pin."""
    return resources.image or config.current().vllm_image


def args(md: ModelDeployment, served_name: str, model_dir: str) -> list[str]:
    """`vllm serve` arguments: the model folder, then flags from the spec."""
    spec = md.spec
    settings = spec.vllm or VllmSettings()
    flags = [
        model_dir,
        "--served-model-name",
        served_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(spec.server.port),
        "--tensor-parallel-size",
        str(spec.resources.gpus),
        "--dtype",
        settings.dtype,
        "--gpu-memory-utilization",
        f"{settings.gpu_memory_utilization:g}",
    ]
    if settings.max_model_len is not None:
        flags += ["--max-model-len", str(settings.max_model_len)]
    return flags


# The ranks --max-lora-rank accepts (vllm/config/lora.py MaxLoRARanks of the pinned release).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_LORA_RANK = 64  # for adapters given by folder, whose rank the operator cannot see


def lora_args(folders: list[tuple[str, str]], rank: int) -> list[str]:
    """Serve LoRA adapters by name: `--lora-modules name=folder ...`, with room for all of
    them at once and for the largest rank among them."""
    room = next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])
    return [
        "--enable-lora",
        "--max-loras",
        str(len(folders)),
        "--max-lora-rank",
        str(room),
        "--lora-modules",
        *(f"{name}={folder}" for name, folder in folders),
    ]


def env(md: ModelDeployment) -> list[dict[str, Any]]:
    cache = f"{HOME}/.cache"
    entries: list[dict[str, Any]] = [
        {"name": "HOME", "value": HOME},
        # getpass.getuser() (torch.compile's cache) fails for a uid the image does not name.
        {"name": "USER", "value": "vllm"},
        {"name": "XDG_CACHE_HOME", "value": cache},
        {"name": "XDG_CONFIG_HOME", "value": f"{HOME}/.config"},
        {"name": "HF_HOME", "value": f"{cache}/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{cache}/vllm"},
        {"name": "VLLM_CONFIG_ROOT", "value": f"{HOME}/.config/vllm"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache}/torchinductor"},
        {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
        {"name": "NUMBA_CACHE_DIR", "value": f"{cache}/numba"},
        # The model is a local folder: nothing is fetched from a hub, nothing reported home.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "VLLM_DO_NOT_TRACK", "value": "1"},
    ]
    secret = md.spec.server.auth_token_secret
    if secret is not None:
        # By reference: the pod spec names the Secret, never holds the key.
        entries.append(
            {
                "name": API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.key}},
            }
        )
    return entries


def probes() -> dict[str, dict[str, Any]]:
    """Startup, readiness and liveness on /health; /metrics is served on the same port."""
    http_get = {"path": HEALTH_PATH, "port": "http"}
    return {
        "startupProbe": {
            "httpGet": http_get,
            "periodSeconds": STARTUP_PERIOD,
            "timeoutSeconds": 5,
            "failureThreshold": STARTUP_SECONDS // STARTUP_PERIOD,
        },
        "readinessProbe": {
            "httpGet": http_get,
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        # A busy engine answers slowly; restarting a loaded replica costs minutes.
        "livenessProbe": {
            "httpGet": http_get,
            "periodSeconds": 10,
            "timeoutSeconds": 10,
            "failureThreshold": 6,
        },
    }


def home_volume() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return (
        [{"name": "vllm-home", "emptyDir": {}}],
        [{"name": "vllm-home", "mountPath": HOME}],
    )


def container_fields(md: ModelDeployment, served_name: str, model_dir: str) -> dict[str, Any]:
    """What the vLLM container sets that the built-in server's does differently."""
    return {
        "image": image(md.spec.resources),
        "command": ["vllm", "serve"],
        "args": args(md, served_name, model_dir),
        "env": env(md),
        **probes(),
    }
