"""Schemathesis against the inference server's own `/openapi.json` (by hand, not a test).

    python benchmarks/serve_schemathesis.py [--max-examples 100] [--checks all] [--seed 1]

Writes a tiny random model in the trainer's export format, starts
`python -m llmops_trainer.serve` on it, fetches the served document, pins the request bodies'
`model` to the served name (otherwise nearly every generated body names another model and
gets a 404) and runs the `schemathesis` command line against the server with the given
checks (default: every check). Prints schemathesis' summary and the count of failures per
check. Needs the `dev` extra (schemathesis); nothing is downloaded.

The trainer tier runs a bounded version of the same (tests/trainer/test_serve_openapi.py);
this script is the larger run whose figures the serving notes quote. Point PYTHONPATH at
another checkout's trainer_image to measure that code instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from serve_load import wait_ready  # the scripts run from benchmarks/

ROOT = Path(__file__).resolve().parents[1]
SERVED = "tiny"


def pin_model(document: dict[str, Any], name: str) -> dict[str, Any]:
    """Every request body's `model` property accepts only the served name."""
    for schema in document.get("components", {}).get("schemas", {}).values():
        properties = schema.get("properties", {})
        if "model" in properties and ({"prompt", "messages"} & set(properties)):
            properties["model"] = {"type": "string", "enum": [name]}
    return document


def start(
    model_dir: Path, port: int, extra: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "llmops_trainer.serve", "--model-dir", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--served-name", SERVED,
        "--max-new-tokens", "16", "--device", "cpu", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    return wait_ready(process, port, 120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--checks", default="all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", default="all", help="positive, negative or all")
    parser.add_argument("--port", type=int, default=18321)
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag")
    parser.add_argument("--token", help="serve with this bearer token (and send it)")
    parser.add_argument("--exclude-checks", default="", help="checks to skip")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests" / "trainer"))
    from serve_support import make_model

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = make_model(Path(scratch) / "out" / "model")
        env = dict(os.environ)
        auth: list[str] = []
        if args.token:
            (Path(scratch) / "token").write_text(args.token)
            env["LLMOPS_AUTH_TOKEN_FILE"] = str(Path(scratch) / "token")
            auth = ["--header", f"Authorization: Bearer {args.token}"]
        process = start(model_dir, args.port, args.server_arg, env)
        url = f"http://127.0.0.1:{args.port}"
        try:
            document = pin_model(httpx.get(url + "/openapi.json").json(), SERVED)
            schema = Path(scratch) / "openapi.json"
            schema.write_text(json.dumps(document))
            command = [
                str(Path(sys.executable).parent / "schemathesis"), "run", str(schema),
                "--url", url, "--checks", args.checks, "--max-examples",
                str(args.max_examples), "--seed", str(args.seed), "--mode", args.mode,
                "--no-color", "--output-sanitize", "false", "--request-timeout", "60",
                "--workers", "1",
                "--suppress-health-check", "all", "--continue-on-failure", *auth,
            ]  # fmt: skip
            if args.exclude_checks:
                command += ["--exclude-checks", args.exclude_checks]
            started = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - started
        finally:
            process.terminate()
            process.wait(timeout=120)
    print(run.stdout[-12000:])
    print(run.stderr[-2000:], file=sys.stderr)
    failures: dict[str, int] = {}
    for line in run.stdout.splitlines():
        found = re.match(r"^\s*\S*\s*(ST\d+ [^:]+):\s+(\d+)$", line)
        if found:
            failures[found.group(1)] = int(found.group(2))
    print(f"exit code {run.returncode} after {seconds:.0f} s; failures by check: {failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
