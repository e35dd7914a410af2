"""The interface of a vLLM release that the operator relies on, read from its wheel without
installing it (vLLM needs CUDA and torch): the flags `vllm serve` accepts, the Prometheus
metrics its server exports and the environment variables it reads.

    pip download vllm==0.33.0 --no-deps -d /tmp/vllm
    python tests/unit/vllm_interface.py /tmp/vllm/vllm-0.33.0-*.whl > tests/unit/vllm_interface.txt

Where each list comes from, in the wheel:
- flags: every `--` string given to an `add_argument(...)` call in vllm/engine/arg_utils.py
  (EngineArgs, AsyncEngineArgs) and vllm/entrypoints/common/cli_args.py (make_arg_parser),
  plus each field of the frontend dataclasses there (registered as `--<field-name>`);
- metrics: each `self._{gauge,counter,histogram}_cls(name="vllm:...")` in vllm/v1/metrics/;
- positionals: the other names given to those `add_argument` calls (`model_tag`);
- choices of `--dtype`: the `ModelDType` literal in vllm/config/model.py;
- env: the keys of `environment_variables` in vllm/envs.py.

tests/unit/test_vllm.py checks the builder's flags, metric names and variables against the
list of the pinned version.
"""

from __future__ import annotations

import ast
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

FIXTURE = Path(__file__).with_name("vllm_interface.txt")
FLAG_FILES = ("vllm/engine/arg_utils.py", "vllm/entrypoints/common/cli_args.py")
FRONTEND_CLASSES = ("BaseFrontendArgs", "FrontendArgs")
METRIC = re.compile(r"self\._(gauge|counter|histogram)_cls\(\s*name=\"(vllm:[a-z0-9_]+)\"")


@dataclass
class Interface:
    version: str
    flags: set[str] = field(default_factory=set)
    positionals: set[str] = field(default_factory=set)
    dtypes: set[str] = field(default_factory=set)
    metrics: dict[str, str] = field(default_factory=dict)  # name -> gauge/counter/histogram
    env: set[str] = field(default_factory=set)


def _arguments(source: str) -> tuple[set[str], set[str]]:
    """(flags, positionals) a module registers."""
    tree = ast.parse(source)
    flags: set[str] = set()
    positionals: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            names = [
                arg.value
                for arg in node.args
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            ]
            flags |= {n for n in names if n.startswith("--")}
            positionals |= {n for n in names if not n.startswith("-")}
        if isinstance(node, ast.ClassDef) and node.name in FRONTEND_CLASSES:
            flags |= {
                "--" + item.target.id.replace("_", "-")
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    return flags, positionals


def _dtypes(source: str) -> set[str]:
    found = re.search(r"^ModelDType = Literal\[([^\]]*)\]", source, re.MULTILINE)
    if not found:
        raise ValueError("no ModelDType in vllm/config/model.py")
    return set(re.findall(r'"([^"]+)"', found.group(1)))


def _env(source: str) -> set[str]:
    for node in ast.walk(ast.parse(source)):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if (
            isinstance(target, ast.Name)
            and target.id == "environment_variables"
            and isinstance(node, ast.Assign | ast.AnnAssign)
            and isinstance(node.value, ast.Dict)
        ):
            return {
                k.value
                for k in node.value.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            }
    raise ValueError("no environment_variables dict in vllm/envs.py")


def extract(wheel: Path) -> Interface:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        version = next(
            n.split("/")[0].removeprefix("vllm-").removesuffix(".dist-info")
            for n in names
            if n.endswith(".dist-info/METADATA")
        )

        def read(name: str) -> str:
            return archive.read(name).decode()

        found = Interface(version)
        for name in FLAG_FILES:
            flags, positionals = _arguments(read(name))
            found.flags |= flags
            found.positionals |= positionals
        found.dtypes = _dtypes(read("vllm/config/model.py"))
        for name in names:
            if name.startswith("vllm/v1/metrics/") and name.endswith(".py"):
                for kind, metric in METRIC.findall(read(name)):
                    found.metrics[metric] = kind
        found.env = _env(read("vllm/envs.py"))
    return found


def render(found: Interface) -> str:
    lines = [
        f"# vLLM {found.version}: flags of `vllm serve`, metrics of its server, environment",
        "# variables it reads. Generated from the PyPI wheel by tests/unit/vllm_interface.py",
        "# (see there for where in the source each list comes from); do not edit.",
        f"version {found.version}",
        *(f"flag {f}" for f in sorted(found.flags)),
        *(f"positional {p}" for p in sorted(found.positionals)),
        *(f"dtype {d}" for d in sorted(found.dtypes)),
        *(f"metric {kind} {name}" for name, kind in sorted(found.metrics.items())),
        *(f"env {e}" for e in sorted(found.env)),
    ]
    return "\n".join(lines) + "\n"


def series(found: Interface) -> set[str]:
    """The Prometheus series the metrics expose (prometheus-client's suffixes)."""
    names: set[str] = set()
    for name, kind in found.metrics.items():
        if kind == "counter":
            base = name.removesuffix("_total")
            names |= {base + "_total", base + "_created"}
        elif kind == "histogram":
            names |= {name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(name)
    return names


def load(path: Path = FIXTURE) -> Interface:
    found = Interface("")
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        kind, _, rest = line.partition(" ")
        if kind == "version":
            found.version = rest
        elif kind == "flag":
            found.flags.add(rest)
        elif kind == "positional":
            found.positionals.add(rest)
        elif kind == "dtype":
            found.dtypes.add(rest)
        elif kind == "metric":
            metric_type, name = rest.split()
            found.metrics[name] = metric_type
        elif kind == "env":
            found.env.add(rest)
        else:
            raise ValueError(f"{path}: unknown line {line!r}")
    return found


if __name__ == "__main__":
    sys.stdout.write(render(extract(Path(sys.argv[1]))))
