"""The `llmops` command line (also `python -m llmops`)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from llmops import __version__


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
        # kopf logs every successful timer run at INFO; keep the log for what matters.
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
