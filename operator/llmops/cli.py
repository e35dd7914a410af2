"""The `llmops` command line (also `python -m llmops`)."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llmops import __version__

if TYPE_CHECKING:
    from llmops.plan import Plan


def _cmd_version(_: argparse.Namespace) -> int:
    print(__version__)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    # Imported here: the other commands must not pay for the controllers' imports.
    from llmops.local.runner import RunOptions, run

    options = RunOptions(
        files=[Path(p) for p in args.filename],
        state_dir=Path(args.state_dir),
        serve=not args.no_serve,
        detach=args.detach,
        overrides=args.set or [],
    )
    return run(options)


def _cmd_status(args: argparse.Namespace) -> int:
    from llmops.local.status import show

    return show(Path(args.state_dir), args.kind, args.names, args.output)


def _source_root() -> Path:
    """The repository root when running from a source checkout, else the working folder."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def _cmd_crds(args: argparse.Namespace) -> int:
    from llmops.crdgen import outputs, write_all

    folders = [Path(p) for p in args.output] if args.output else outputs(_source_root())
    for folder in folders:
        for path in write_all(folder):
            print(f"wrote {path}")
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    # Imported here: the other commands must not pay for kopf and the controllers.
    import kopf
    from prometheus_client import start_http_server

    import llmops.controllers  # noqa: F401  (registers the handlers)
    from llmops import config

    config.current()  # a bad chart value stops the operator here, naming the variable

    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind_address)
    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # kopf logs every successful handler run at INFO; keep the log for what matters.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        standalone=True,  # one replica (Recreate), so no peering between operators
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        liveness_endpoint=(
            f"http://{args.bind_address}:{args.health_port}/healthz" if args.health_port else None
        ),
    )
    return 0


def _prices(path: str | None) -> dict[str, float]:
    """The `--prices` file: a YAML mapping of accelerator type to price per hour."""
    if path is None:
        return {}
    import yaml

    loaded = yaml.safe_load(Path(path).read_text())
    if not isinstance(loaded, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in loaded.values()
    ):
        raise ValueError(f"{path}: expected a mapping of accelerator type to price per hour")
    return {str(k).lower(): float(v) for k, v in loaded.items()}


def _print_plans(plans: list[Plan], output: str) -> None:
    if output == "json":
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for plan in plans:
        table = Table(title=f"TrainingRun {plan.name}", title_justify="left")
        table.add_column("estimate")
        table.add_column("value", overflow="fold")
        for quantity, value in plan.rows():
            table.add_row(quantity, value)
        console.print(table)
        console.print(plan.summary(), soft_wrap=True)


def _cmd_plan(args: argparse.Namespace) -> int:
    """Exit 0 when every run fits, 1 when one does not, 2 on invalid input."""
    import sys

    from llmops.manifests import ManifestError, load_manifests
    from llmops.plan import PlanError, PlanOptions, plan_documents

    try:
        options = PlanOptions(
            accelerator=args.accelerator,
            mfu=args.mfu,
            peak_flops=args.peak_flops,
            price_per_hour=args.price_per_hour,
            prices=_prices(args.prices),
            vocab_size=args.vocab_size,
            model_config=Path(args.model_config) if args.model_config else None,
        )
        plans = plan_documents(load_manifests(Path(p) for p in args.filename), options)
    except (ManifestError, PlanError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not plans:
        print(f"error: no TrainingRun in {', '.join(args.filename)}", file=sys.stderr)
        return 2
    _print_plans(plans, args.output)
    return 0 if all(p.fits for p in plans) else 1


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("version", help="print the version").set_defaults(func=_cmd_version)

    crds = sub.add_parser("crds", help="generate the CustomResourceDefinitions from the API models")
    crds.add_argument(
        "--output",
        "-o",
        action="append",
        metavar="DIR",
        help=(
            "folder to write one YAML file per kind into (repeatable; default: crds/ and "
            "helm/llmops/crds/ of the source tree)"
        ),
    )
    crds.set_defaults(func=_cmd_crds)

    operator = sub.add_parser("operator", help="run the operator (the kopf controllers)")
    scope = operator.add_mutually_exclusive_group(required=True)
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        help="watch this namespace (repeatable; globs allowed)",
    )
    operator.add_argument(
        "--metrics-port",
        type=int,
        default=8000,
        help="port of the Prometheus /metrics endpoint (0 disables it)",
    )
    operator.add_argument(
        "--health-port",
        type=int,
        default=8080,
        help="port of the /healthz liveness endpoint kopf serves (0 disables it)",
    )
    operator.add_argument(
        "--bind-address",
        default="127.0.0.1",
        help=(
            "address the metrics and health endpoints listen on (the chart passes 0.0.0.0 so "
            "the kubelet and Prometheus reach them)"
        ),
    )
    operator.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    operator.set_defaults(func=_cmd_operator)

    run = sub.add_parser("run", help="run manifests on this machine (the local runtime)")
    run.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="a manifest file or a folder of them (repeatable)",
    )
    run.add_argument(
        "--state-dir",
        default=".llmops",
        help="where volumes, logs and status are kept (default: .llmops)",
    )
    run.add_argument(
        "--set",
        action="append",
        metavar="KIND/NAME.PATH=VALUE",
        help=(
            "change a field before running, e.g. tr/demo.spec.hyperparameters.maxSteps=40 "
            "(VALUE is YAML; repeatable)"
        ),
    )
    serving = run.add_mutually_exclusive_group()
    serving.add_argument(
        "--no-serve", action="store_true", help="stop before serving ModelDeployments"
    )
    serving.add_argument(
        "--detach",
        action="store_true",
        help="leave the model server running in the background and return",
    )
    run.set_defaults(func=_cmd_run)

    plan = sub.add_parser(
        "plan", help="estimate parameters, FLOPs, memory per GPU, time and cost of TrainingRuns"
    )
    plan.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        help="a manifest file or a folder of them (repeatable); TrainingRuns are planned",
    )
    plan.add_argument(
        "--accelerator",
        metavar="T",
        help=(
            "accelerator type: h200, h100, a100-80gb, a100, l40s, a10g, l4, t4 or cpu "
            "(default: the GPU product of the run's nodeSelector, else cpu for a gang "
            "without GPUs, else h100)"
        ),
    )
    plan.add_argument(
        "--mfu", type=_ratio, default=0.4, help="assumed model FLOPs utilization (default 0.4)"
    )
    plan.add_argument(
        "--peak-flops",
        type=_positive,
        metavar="F",
        help="peak FLOP/s per accelerator (per process on CPUs), instead of the table's",
    )
    prices = plan.add_mutually_exclusive_group()
    prices.add_argument(
        "--price-per-hour", type=_positive, metavar="P", help="price per accelerator-hour"
    )
    prices.add_argument(
        "--prices", metavar="FILE", help="YAML mapping of accelerator type to price per hour"
    )
    plan.add_argument(
        "--vocab-size",
        type=int,
        metavar="N",
        help="vocabulary size when no Dataset in the files fixes it",
    )
    plan.add_argument(
        "--model-config",
        metavar="FILE",
        help="config.json of a model.pretrained that is not a local path",
    )
    plan.add_argument("-o", "--output", choices=("table", "json"), default="table")
    plan.set_defaults(func=_cmd_plan)

    for command in ("status", "get"):
        status = sub.add_parser(
            command, help="show the resources of a local run (status, metrics, conditions)"
        )
        status.add_argument("kind", nargs="?", help="ds, tr, md (or a resource name)")
        status.add_argument("names", nargs="*", help="resource names")
        status.add_argument("--state-dir", default=".llmops", help="the run's state directory")
        status.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
        status.set_defaults(func=_cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
