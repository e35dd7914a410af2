"""`llmops run`: validate, order, then run each resource with the operator's builders; serve
what is to be served; stop cleanly on Ctrl-C (a second `llmops run` resumes)."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from rich.console import Console

from llmops.local import dataset, serving, state, sweep, training
from llmops.local.context import Context, key_of, local_gpus
from llmops.local.resources import InvalidManifests, config_maps, order, secrets, validate
from llmops.local.status import status_table
from llmops.local.view import RunView
from llmops.manifests import ManifestError, apply_overrides, load_manifests

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130
EXAMPLE_PROMPT = "Once upon a time"


@dataclass
class RunOptions:
    files: list[Path]
    state_dir: Path = Path(state.DEFAULT_STATE_DIR)
    serve: bool = True
    detach: bool = False
    cwd: Path = field(default_factory=Path.cwd)
    live: bool | None = None  # None: a live table on terminals, lines otherwise
    overrides: list[str] = field(default_factory=list)  # `--set KIND/NAME.path=VALUE`


def examples(server: serving.Server) -> str:
    body = f'{{"model": "{server.model}", "prompt": "{EXAMPLE_PROMPT}", "max_tokens": 32}}'
    return "\n".join(
        [
            f"[bold]{server.body['kind']}/{server.body['metadata']['name']}[/] serves "
            f"[bold]{server.model}[/] at [link={server.url}]{server.url}[/link]",
            "",
            "  curl:",
            f"    curl -s {server.url}/completions -H 'Content-Type: application/json' \\",
            f"      -d '{body}'",
            "",
            "  openai (pip install openai):",
            "    from openai import OpenAI",
            f'    client = OpenAI(base_url="{server.url}", api_key="unused")',
            f'    out = client.completions.create(model="{server.model}", '
            f'prompt="{EXAMPLE_PROMPT}", max_tokens=32)',
            "    print(out.choices[0].text)",
        ]
    )


class Interrupts:
    """First Ctrl-C (or SIGTERM): stop gracefully, the trainer checkpoints. Second: kill."""

    def __init__(self, ctx: Context, console: Console) -> None:
        self.ctx = ctx
        self.console = console
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.ctx.stop.is_set():
            self.console.print("[red]stopping now (no checkpoint)[/]")
            self.ctx.kill_all()
            return
        self.ctx.stop.set()
        self.console.print(
            "[yellow]stopping: processes get SIGTERM (training checkpoints first); "
            "Ctrl-C again to kill[/]"
        )


def run(options: RunOptions, console: Console | None = None) -> int:
    console = console or Console()
    try:
        documents = load_manifests(options.files)
        apply_overrides(documents, options.overrides)
        resources, skipped = validate(documents)
        ordered = order(resources)
    except (ManifestError, InvalidManifests) as error:
        Console(stderr=True).print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    # ConfigMaps in the files are mounted where the resources' pods name them (benchmark
    # tasks, for one); every other kind needs a cluster.
    user_config_maps = config_maps(documents)
    try:
        user_secrets = secrets(documents)
    except InvalidManifests as error:
        Console(stderr=True).print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_INVALID
    for name in skipped:
        if not name.startswith(("ConfigMap/", "Secret/")):
            console.print(f"skipping {name}: not an llmops resource", highlight=False)
    if not ordered:
        Console(stderr=True).print(
            "[red]error:[/] no Dataset, TrainingRun, Sweep or ModelDeployment found"
        )
        return EXIT_INVALID
    layout = state.Layout(options.state_dir.resolve())
    bodies = [state.adopt(layout, doc) for doc in ordered]
    view = RunView(console, [key_of(b) for b in bodies], live=options.live)
    ctx = Context(layout=layout, view=view, gpus=local_gpus(), cwd=options.cwd.resolve())
    if ctx.gpus == 0:
        console.print("no GPU found: training runs on the CPU (DeepSpeed's CPU accelerator, gloo)")
    for body in bodies:
        ctx.objects[key_of(body)] = body
    ctx.configmaps.update(user_config_maps)
    ctx.secrets.update(user_secrets)
    servers: list[serving.Server] = []
    ok = True
    with Interrupts(ctx, console), view:
        for body in bodies:
            if ctx.stop.is_set():
                break
            view.update(key_of(body), status=body.get("status") or {})
            try:
                if body["kind"] == "Dataset":
                    ok = dataset.run(ctx, body)
                elif body["kind"] == "TrainingRun":
                    ok = training.run(ctx, body)
                elif body["kind"] == "Sweep":
                    ok = sweep.run(ctx, body)
                else:
                    server = serving.run(ctx, body, serve=options.serve, detach=options.detach)
                    ok = server is not None or not options.serve
                    if server is not None:
                        servers.append(server)
            except ValueError as error:
                ok = False
                view.failure(key_of(body), "", f"cannot run locally: {error}")
            if not ok:
                break
    # The resources of the files, then what they made (a Sweep's trial TrainingRuns).
    shown = [ctx.objects[key_of(b)] for b in bodies]
    shown += [o for k, o in ctx.objects.items() if k not in {key_of(b) for b in bodies}]
    console.print(status_table(shown))
    console.print(f"state, logs and reports: {layout.root}", highlight=False)
    if ctx.stop.is_set():
        for server in servers:
            server.process.terminate()
            serving.stopped(ctx, server)
        console.print("interrupted: run the same command again to resume")
        return EXIT_INTERRUPTED
    if not ok:
        for server in servers:
            server.process.terminate()
            serving.stopped(ctx, server)
        return EXIT_FAILED
    for server in servers:
        console.print(examples(server), highlight=False, soft_wrap=True)
    if servers and options.detach:
        console.print("the server keeps running in the background (`llmops run` again replaces it)")
        return 0
    if servers:
        return _serve_until_stopped(ctx, console, servers)
    return 0


def _serve_until_stopped(ctx: Context, console: Console, servers: list[serving.Server]) -> int:
    console.print("serving until Ctrl-C")
    with Interrupts(ctx, console):
        while not ctx.stop.wait(0.5):
            exited = [s for s in servers if s.process.poll() is not None]
            if exited:
                for server in exited:
                    console.print(f"[red]the server of {server.body['metadata']['name']} exited[/]")
                ctx.stop.set()
    for server in servers:
        code = server.process.terminate()
        serving.stopped(ctx, server)
        if code not in (0, -signal.SIGTERM, 143):
            return EXIT_FAILED
    return 0
