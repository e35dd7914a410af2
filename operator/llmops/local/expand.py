"""`$(VAR)` expansion and env resolution exactly as the kubelet does them.

Kubernetes expands `$(NAME)` in a container's command, args and env values from the
container's environment: `$$` is an escaped `$`, a reference to an undefined variable stays
as written, and an env value may refer only to variables defined before it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

Rewrite = Callable[[str], str]

OPERATOR = "$"
_ANNOTATION = re.compile(r"^metadata\.annotations\['([^']+)'\]$")
_LABEL = re.compile(r"^metadata\.labels\['([^']+)'\]$")


def expand(text: str, variables: Mapping[str, str]) -> str:
    """A port of k8s.io/kubernetes third_party/forked/golang/expansion.Expand."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == OPERATOR and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            read, is_var, advance = _read_name(text[cursor + 1 :])
            if is_var:
                out.append(variables.get(read, f"$({read})"))
            else:
                out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def _read_name(rest: str) -> tuple[str, bool, int]:
    if rest[0] == OPERATOR:
        return OPERATOR, False, 1  # `$$` -> `$`
    if rest[0] == "(":
        closing = rest.find(")", 1)
        if closing != -1:
            return rest[1:closing], True, closing + 1
        return "$(", False, 1  # unterminated: kept as written
    return OPERATOR + rest[0], False, 1


def field_value(path: str, pod: Mapping[str, Any]) -> str:
    """The value of a downward-API fieldRef for a pod (name, namespace, labels, annotations)."""
    metadata = pod.get("metadata") or {}
    if path == "metadata.name":
        return str(metadata.get("name", ""))
    if path == "metadata.namespace":
        return str(metadata.get("namespace", "default"))
    if path in ("status.podIP", "status.hostIP"):
        return "127.0.0.1"
    if path == "spec.nodeName":
        return "localhost"
    for pattern, key in ((_ANNOTATION, "annotations"), (_LABEL, "labels")):
        match = pattern.match(path)
        if match:
            return str((metadata.get(key) or {}).get(match.group(1), ""))
    raise ValueError(f"fieldRef {path!r} is not supported by the local runtime")


def _same(value: str) -> str:
    return value


# (kind "Secret" or "ConfigMap", name, key) -> the value, None when there is none.
Lookup = Callable[[str, str, str], str | None]


def no_lookup(kind: str, name: str, key: str) -> str | None:
    return None


def resolve_env(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    rewrite: Rewrite = _same,
    lookup: Lookup = no_lookup,
) -> dict[str, str]:
    """The container's env as the kubelet builds it: in order, each value expanded against
    the variables before it; fieldRefs read from the pod; secretKeyRef and configMapKeyRef
    from the Secrets and ConfigMaps given with the manifests (`lookup`). `rewrite` maps each
    literal to its local form before expansion, so an expanded value is never rewritten
    twice."""
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        name = entry["name"]
        if "value" in entry:
            env[name] = expand(rewrite(str(entry["value"])), env)
            continue
        source = entry.get("valueFrom") or {}
        if "fieldRef" in source:
            env[name] = field_value(source["fieldRef"]["fieldPath"], pod)
            continue
        for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if ref in source:
                selector = source[ref]
                value = lookup(kind, str(selector.get("name")), str(selector.get("key")))
                if value is not None:
                    env[name] = value
                elif not selector.get("optional"):
                    raise ValueError(
                        f"env {name}: {kind} {selector.get('name')!r} with key "
                        f"{selector.get('key')!r} is not among the manifests (give it in the "
                        "same files to run locally)"
                    )
                break
        else:
            kind = next(iter(source), "valueFrom")
            raise ValueError(f"env {name}: {kind} is not supported by the local runtime")
    return env


def command_line(
    container: Mapping[str, Any], env: Mapping[str, str], rewrite: Rewrite = _same
) -> list[str]:
    """command + args with `$(VAR)` expanded (an image's entrypoint cannot apply locally)."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if not argv:
        raise ValueError(f"container {container.get('name')!r} sets no command")
    return [expand(rewrite(str(a)), env) for a in argv]
