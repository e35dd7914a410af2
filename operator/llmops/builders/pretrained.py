"""How a pod gets an open-weights model (PretrainedModel): the model initializer (an init
container running `llmops_trainer.model_init`) and the environment of the main container.

- An absolute path is inside the image and a `pvc://` model is mounted read-only: the
  initializer only verifies it in place.
- `s3://`, `https://` and `hf://` models are downloaded by the initializer into `target`
  (the run's checkpoint volume, so a restarted gang reuses them; scratch where the run has
  no volume). On a shared volume only pod 0 downloads; the others wait for its marker.

Credentials are referenced (`secretKeyRef`), never copied into the pod spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmops.api.common import PretrainedModel, Resources
from llmops.api.workload import PRETRAINED_MOUNT_DIR, TERMINATION_LOG, Env, model_init_command
from llmops.builders import pods, storage

INIT_CONTAINER = "model-init"
VOLUME = "pretrained"
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
HF_TOKEN_KEY = "HF_TOKEN"


@dataclass
class ModelInput:
    """What a pod spec gains for one pretrained model."""

    init_container: dict[str, Any]
    env: list[dict[str, Any]]  # for the main container: where the verified model is
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)  # for both containers


def is_remote(model: PretrainedModel) -> bool:
    return model.uri.startswith(("s3://", "https://", "hf://"))


def source_env(model: PretrainedModel) -> list[dict[str, Any]]:
    """The initializer's view of the source: URI, https files, endpoint and credentials."""
    env: list[dict[str, Any]] = [
        {"name": Env.PRETRAINED_URI, "value": model.uri},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},  # usage reports: not ours to send
    ]
    if model.files:
        files = [f.model_dump() for f in model.files]
        env.append({"name": Env.PRETRAINED_FILES, "value": json.dumps(files)})
    if model.endpoint:
        variable = "AWS_ENDPOINT_URL" if model.uri.startswith("s3://") else "HF_ENDPOINT"
        env.append({"name": variable, "value": model.endpoint})
    secret = model.credentials_secret
    if secret is not None:
        keys = S3_KEYS if model.uri.startswith("s3://") else (HF_TOKEN_KEY,)
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
            for key in keys
        ]
    return env


def model_input(
    model: PretrainedModel,
    *,
    target: str,
    shared: bool,
    resources: Resources,
    extra_mounts: list[dict[str, Any]],
    tokenizer_only: bool = False,
    any_model: bool = False,
) -> ModelInput:
    """The initializer and env for `model`. `target` is where a remote model is downloaded
    (inside `extra_mounts`, which the initializer also gets); `shared` says whether every
    pod of the gang sees the same `target` (a volume), so that only pod 0 downloads."""
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if is_remote(model):
        folder = target
    else:
        volumes, mounts, path = storage.read_only_volume(VOLUME, model.uri, PRETRAINED_MOUNT_DIR)
        folder = path or model.uri
    env = [{"name": Env.PRETRAINED_DIR, "value": folder}]
    init_env = [
        *source_env(model),
        *env,
        {"name": Env.TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": Env.PRETRAINED_SHARED, "value": "1" if shared else "0"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    scratch_volumes, scratch_mounts = pods.scratch_volumes()
    del scratch_volumes  # the pod already has them; the initializer mounts them too
    init_container = {
        "name": INIT_CONTAINER,
        "image": pods.trainer_image(resources),
        "command": model_init_command(tokenizer_only=tokenizer_only, any_model=any_model),
        "env": init_env,
        "securityContext": pods.container_security_context(),
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "File",
        "volumeMounts": [*scratch_mounts, *extra_mounts, *mounts],
    }
    return ModelInput(init_container=init_container, env=env, volumes=volumes, mounts=mounts)
