"""The ``hookline`` command: run the gateway, manage keys, and submit and inspect jobs.

A thin layer: server commands turn flags into :class:`~hookline.config.Settings`; client commands
speak the HTTP API like any other caller. Every flag has a ``HOOKLINE_*`` environment twin.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from hookline.client import ClientError
from hookline.config import Settings, load_settings
from hookline.errors import HooklineError

app = typer.Typer(
    help="hookline: a self-hosted asynchronous AI gateway.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect jobs.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")
batch_app = typer.Typer(
    help="Run batches of requests (OpenAI's Batch format).", no_args_is_help=True
)
app.add_typer(batch_app, name="batch")
console = Console()
err_console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", envvar="HOOKLINE_CONFIG", help="TOML config file.")
]
DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="HOOKLINE_DATABASE_URL",
        help="sqlite:///file.db or postgresql://… (default: sqlite:///hookline.db)",
    ),
]
HostOpt = Annotated[str | None, typer.Option("--host", envvar="HOOKLINE_HOST")]
PortOpt = Annotated[int | None, typer.Option("--port", envvar="HOOKLINE_PORT")]
LogOpt = Annotated[str | None, typer.Option("--log-level", envvar="HOOKLINE_LOG_LEVEL")]
MigrateOpt = Annotated[
    bool,
    typer.Option(
        "--migrate/--no-migrate",
        envvar="HOOKLINE_MIGRATE",
        help="Bring the database schema up to date at start (off: run `hookline migrate` per release).",
    ),
]
UrlOpt = Annotated[
    str, typer.Option("--url", envvar="HOOKLINE_URL", help="The gateway's base URL.")
]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="HOOKLINE_API_KEY", help="Your API key.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print raw JSON.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except HooklineError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(
        logging.WARNING
    )  # its INFO lines are noise at every start


def tune_interpreter() -> None:
    """Collect the young generation less often: a gateway makes many short-lived objects per
    request, and the default threshold (700) ran a collection every few requests (measured on the
    submit benchmark: +31% accepted jobs/s). Hand the GIL over every 0.5 ms instead of 5 ms: a
    SQLite commit finishing on the writer thread then waits at most that long for the busy event
    loop (see docs/benchmarks.md)."""
    gc.set_threshold(50_000, 50, 100)
    sys.setswitchinterval(0.0005)


def _serve_http(settings: Settings, *, run_worker: bool, migrate: bool = True) -> None:
    import uvicorn

    from hookline.api import create_app
    from hookline.gateway import Gateway

    _logging(settings.log_level)
    tune_interpreter()
    gateway = Gateway(settings, run_worker=run_worker, migrate=migrate)
    config = uvicorn.Config(
        create_app(gateway),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        ws="websockets-sansio",
        timeout_graceful_shutdown=5,  # long-polls and streams are told to reconnect, not waited on
    )
    uvicorn.Server(config).run()


@app.command()
def serve(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    log_level: LogOpt = None,
) -> None:
    """Run the API and the worker in one process (migrating the database first)."""
    settings = _settings(
        config, database_url=database_url, host=host, port=port, log_level=log_level
    )
    _serve_http(settings, run_worker=True)


@app.command("api")
def api_command(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    log_level: LogOpt = None,
    migrate: MigrateOpt = True,
) -> None:
    """Run only the HTTP API (workers run elsewhere against the same database)."""
    settings = _settings(
        config, database_url=database_url, host=host, port=port, log_level=log_level
    )
    _serve_http(settings, run_worker=False, migrate=migrate)


@app.command()
def worker(
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
    log_level: LogOpt = None,
    migrate: MigrateOpt = True,
) -> None:
    """Run only a worker: claim jobs and call upstreams until SIGTERM, then drain."""
    from hookline.gateway import Gateway

    settings = _settings(config, database_url=database_url, log_level=log_level)
    _logging(settings.log_level)
    tune_interpreter()

    async def run() -> None:
        gateway = Gateway(settings, run_worker=True, serve_api=False, migrate=migrate)
        await gateway.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        logging.getLogger("hookline").info("draining: no new claims")
        await gateway.stop()

    asyncio.run(run())


@app.command()
def migrate(config: ConfigOpt = None, database_url: DatabaseOpt = None) -> None:
    """Bring the database schema up to date (run once before starting split processes)."""
    from hookline.store import open_store

    settings = _settings(config, database_url=database_url)

    async def run() -> None:
        store = await open_store(settings.database_url, migrate=True)
        await store.close()

    asyncio.run(run())
    console.print("database is up to date")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant the key acts for.")],
    config: ConfigOpt = None,
    database_url: DatabaseOpt = None,
) -> None:
    """Create an API key for a tenant and print it (it is stored only as a hash)."""
    from hookline.auth import KeyRing
    from hookline.store import open_store

    settings = _settings(config, database_url=database_url)

    async def run() -> str:
        store = await open_store(settings.database_url, migrate=True)
        try:
            return await KeyRing(store).create(tenant)
        finally:
            await store.close()

    try:
        key = asyncio.run(run())
    except HooklineError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    print(key)


# --- client commands


def _client(url: str, api_key: str | None) -> httpx.Client:
    if not api_key:
        err_console.print(
            "[red]error:[/red] no API key: pass --api-key or set HOOKLINE_API_KEY "
            "(create one with `hookline keys create --tenant NAME`)"
        )
        raise typer.Exit(2)
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=httpx.Timeout(90.0)
    )


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]error:[/red] cannot reach {client.base_url}: {exc}")
        raise typer.Exit(1) from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        err_console.print(f"[red]error {response.status_code}:[/red] {detail}")
        raise typer.Exit(1)
    body: dict[str, Any] = response.json()
    return body


def output_text(job: dict[str, Any]) -> str | None:
    """The generated text of a finished job, when it has any."""
    output = job.get("output") or {}
    texts = []
    for choice in output.get("choices") or []:
        message = choice.get("message") or {}
        text = message.get("content") if message else choice.get("text")
        if text:
            texts.append(text)
    return "\n".join(texts) if texts else None


def _print_job(job: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for field in ("id", "status", "operation", "model", "upstream", "attempts", "created_at",
                  "started_at", "finished_at"):  # fmt: skip
        table.add_row(f"[bold]{field}[/bold]", str(job.get(field)))
    if job.get("error"):
        table.add_row("[bold red]error[/bold red]", json.dumps(job["error"]))
    console.print(table)
    text = output_text(job)
    if text is not None:
        console.print(text)
    elif job.get("output") is not None:
        console.print_json(data=job["output"])


@app.command()
def submit(
    message: Annotated[
        list[str] | None, typer.Option("--message", "-m", help="A user message (repeatable).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="The model to call.")] = None,
    operation: Annotated[str, typer.Option("--operation", "-o")] = "chat.completions",
    system: Annotated[str | None, typer.Option("--system", help="A system message.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="completions: the prompt.")] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="embeddings: a text (repeatable).")
    ] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens")] = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", "-f", help="A JSON file: a whole job, or just its input body."),
    ] = None,
    metadata: Annotated[
        list[str] | None, typer.Option("--metadata", help="key=value (repeatable).")
    ] = None,
    priority: Annotated[int, typer.Option("--priority")] = 0,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="With --wait: give up after.")] = 600,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job, from flags or a JSON file; with --wait, print its result."""
    job_body = _job_body(file, operation, model, message, system, prompt, text, max_tokens)
    job_body["priority"] = priority
    if metadata:
        job_body["metadata"] = dict(item.split("=", 1) for item in metadata if "=" in item)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(url, api_key) as client:
        job = _call(client, "POST", "/v1/jobs", json=job_body, headers=headers)
        if wait:
            job = _wait(client, job, timeout)
    if as_json:
        print(json.dumps(job, indent=2))
    elif wait:
        if job["status"] == "succeeded":
            text_out = output_text(job)
            print(text_out if text_out is not None else json.dumps(job["output"], indent=2))
        else:
            err_console.print(f"job {job['id']} {job['status']}: {json.dumps(job.get('error'))}")
    else:
        console.print(f"{job['id']} {job['status']}")
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


def _job_body(
    file: Path | None,
    operation: str,
    model: str | None,
    messages: list[str] | None,
    system: str | None,
    prompt: str | None,
    texts: list[str] | None,
    max_tokens: int | None,
) -> dict[str, Any]:
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            err_console.print(f"[red]error:[/red] cannot read {file}: {exc}")
            raise typer.Exit(2) from exc
        if isinstance(loaded, dict) and "operation" in loaded and "input" in loaded:
            body: dict[str, Any] = loaded
        else:
            body = {"operation": operation, "input": loaded}
    else:
        request: dict[str, Any] = {}
        if operation == "chat.completions":
            chat = [{"role": "system", "content": system}] if system else []
            chat += [{"role": "user", "content": m} for m in messages or []]
            request["messages"] = chat
        elif operation == "completions":
            request["prompt"] = prompt or ""
        else:
            request["input"] = texts or []
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        body = {"operation": operation, "input": request}
    if model:
        body["model"] = model
    return body


def _wait(client: httpx.Client, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with console.status(f"waiting for {job['id']}…", spinner="dots"):
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            wait = max(1, min(30, int(deadline - time.monotonic())))
            job = _call(client, "GET", f"/v1/jobs/{job['id']}", params={"wait": wait})
    return job


@jobs_app.command("list")
def jobs_list(
    status: Annotated[list[str] | None, typer.Option("--status")] = None,
    operation: Annotated[list[str] | None, typer.Option("--operation")] = None,
    limit: Annotated[int, typer.Option("--limit")] = 20,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List your most recent jobs."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status
    if operation:
        params["operation"] = operation
    with _client(url, api_key) as client:
        page = _call(client, "GET", "/v1/jobs", params=params)
    if as_json:
        print(json.dumps(page, indent=2))
        return
    table = Table("id", "status", "operation", "model", "attempts", "created_at")
    for job in page["data"]:
        table.add_row(
            job["id"], job["status"], job["operation"], job["model"], str(job["attempts"]),
            job["created_at"],
        )  # fmt: skip
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Show one job and its output."""
    with _client(url, api_key) as client:
        job = _call(client, "GET", f"/v1/jobs/{job_id}")
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        _print_job(job)


@app.command()
def listen(
    forward_to: Annotated[
        str,
        typer.Option(
            "--forward-to", help="The local URL to deliver to, e.g. http://localhost:3000/hook"
        ),
    ],
    events: Annotated[
        list[str] | None, typer.Option("--events", help="Only these event types (repeatable).")
    ] = None,
    state_file: Annotated[
        Path | None, typer.Option("--state-file", help="Where the resume point is kept.")
    ] = None,
    max_events: Annotated[
        int | None, typer.Option("--max-events", help="Stop after this many deliveries.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Forward your tenant's events to a local URL, signed like real webhooks (development without
    a public URL); resumes where it stopped."""
    from hookline.listen import Delivery, Listener, default_state_file

    def report(delivery: Delivery) -> None:
        if delivery.status is None:
            outcome = f"[red]failed[/red] {delivery.error}"
        elif 200 <= delivery.status < 300:
            outcome = f"[green]{delivery.status}[/green] {delivery.millis:.0f} ms"
        else:
            outcome = f"[yellow]{delivery.status}[/yellow] {delivery.millis:.0f} ms"
        console.print(f"{delivery.type:<18} {delivery.subject}  → {outcome}", highlight=False)

    with _client(url, api_key) as client:
        assert api_key is not None
        state = state_file or default_state_file(url, api_key, forward_to)
        listener = Listener(client, forward_to, events=events, state_file=state)
        err_console.print(f"forwarding events of {url} to {forward_to} (Ctrl-C to stop)")
        try:
            listener.run(report, limit=max_events)
        except ClientError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc


@jobs_app.command("tail")
def jobs_tail(job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None) -> None:
    """Print a job's output as it is produced, then its final status."""
    from hookline.client import Client, Event, TextDelta

    _client(url, api_key).close()  # the same clear error when there is no key
    attempt = 1
    try:
        with Client(url, api_key) as client:
            for item in client.stream(job_id):
                if isinstance(item, TextDelta):
                    sys.stdout.write(item.text)
                    sys.stdout.flush()
                elif (
                    isinstance(item, Event)
                    and item.type == "job.started"
                    and item.data.get("attempt", 1) > attempt
                ):
                    attempt = item.data["attempt"]
                    err_console.print(f"\n[yellow]attempt {attempt} starts over[/yellow]")
            job = client.get(job_id)
    except ClientError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    print()
    line = f"{job.id} {job.status}"
    if job.error:
        line += f": {job.error.get('message')}"
    err_console.print(line)
    if job.status != "succeeded":
        raise typer.Exit(1)


_BATCH_DONE = ("completed", "failed", "expired", "cancelled")


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            yield chunk


@batch_app.command("submit")
def batch_submit(
    file: Annotated[
        Path, typer.Argument(help="A JSONL file: {custom_id, method, url, body} a line.")
    ],
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Default: the lines' url.")
    ] = None,
    completion_window: Annotated[str, typer.Option("--completion-window")] = "24h",
    webhook_url: Annotated[
        str | None, typer.Option("--webhook-url", help="Called when it ends.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show its progress until it ends.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a batch (the file is streamed, whatever its size); with --wait, a progress bar."""
    if not file.is_file():
        err_console.print(f"[red]error:[/red] no file {file}")
        raise typer.Exit(2)
    params = {"completion_window": completion_window}
    if endpoint:
        params["endpoint"] = endpoint
    if webhook_url:
        params["webhook_url"] = webhook_url
    with _client(url, api_key) as client:
        batch = _call(
            client, "POST", "/v1/batches", params=params, content=_file_chunks(file),
            headers={"Content-Type": "application/jsonl"},
        )  # fmt: skip
        if batch["status"] == "failed":
            _print_batch_errors(batch)
            raise typer.Exit(1)
        if wait:
            batch = _follow_batch(client, batch)
    if as_json:
        print(json.dumps(batch, indent=2))
    else:
        counts = batch["request_counts"]
        console.print(
            f"{batch['id']} {batch['status']}: {counts['completed']} completed, "
            f"{counts['failed']} failed of {counts['total']}"
        )
    if wait and batch["status"] != "completed":
        raise typer.Exit(1)


def _print_batch_errors(batch: dict[str, Any]) -> None:
    err_console.print(f"[red]batch {batch['id']} failed validation; nothing ran:[/red]")
    for error in (batch.get("errors") or {}).get("data", []):
        err_console.print(f"  line {error['line']}: {error['message']}")


def _follow_batch(client: httpx.Client, batch: dict[str, Any]) -> dict[str, Any]:
    """Poll the batch every second under a rich progress bar until it ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress("{task.description}", *columns, console=err_console) as progress:
        task = progress.add_task(batch["id"], total=batch["request_counts"]["total"] or None)
        while batch["status"] not in _BATCH_DONE:
            time.sleep(1)
            batch = _call(client, "GET", f"/v1/batches/{batch['id']}")
            counts = batch["request_counts"]
            progress.update(
                task,
                completed=counts["completed"] + counts["failed"],
                total=counts["total"] or None,
                description=f"{batch['id']} {batch['status']}",
            )
    return batch


@batch_app.command("results")
def batch_results(
    batch_id: str,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the results.")],
    errors: Annotated[
        Path | None, typer.Option("--errors", help="Where to write the failed items' lines.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Download a finished batch's output file (and its error file, with --errors)."""
    with _client(url, api_key) as client:
        batch = _call(client, "GET", f"/v1/batches/{batch_id}")
        if batch["status"] not in _BATCH_DONE:
            err_console.print(f"[red]error:[/red] batch {batch_id} is still {batch['status']}")
            raise typer.Exit(1)
        written = [_download(client, batch.get("output_file_id"), output)]
        if errors is not None:
            written.append(_download(client, batch.get("error_file_id"), errors))
    console.print(
        f"{batch_id} {batch['status']}: " + ", ".join(f"{n} lines to {p}" for p, n in written)
    )


def _download(client: httpx.Client, file_id: str | None, path: Path) -> tuple[Path, int]:
    """Stream a file to ``path`` (empty when the batch has no such file); its line count."""
    lines = 0
    with path.open("wb") as handle:
        if file_id is None:
            return path, 0
        with client.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code >= 400:
                err_console.print(f"[red]error {response.status_code}:[/red] {file_id}")
                raise typer.Exit(1)
            for chunk in response.iter_bytes():
                handle.write(chunk)
                lines += chunk.count(b"\n")
    return path, lines


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
