"""The client commands: ``submit``, ``jobs``, ``listen``, ``batch`` and ``webhooks``. They call the
gateway's HTTP API through :class:`hookline.client.Client`, like any other caller, report its
errors as one line on stderr (exit 1; 2 when the command itself was wrong), and print the API's
JSON with ``--json``."""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from hookline.cli.options import (
    DEFAULT_URL,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    console,
    err_console,
    fail,
    print_columns,
    print_json,
)
from hookline.client import Batch, Client, ClientError, Delivery, Event, Job, TextDelta, Timeout

JobIdArg = Annotated[str, typer.Argument(metavar="JOB_ID", help="The job's id (job_…).")]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout", metavar="SECONDS", help="How long --wait and --stream wait, in seconds."
    ),
]


def _client(url: str, api_key: str | None) -> Client:
    if not api_key:
        fail(
            "no API key: pass --api-key or set HOOKLINE_API_KEY "
            "(create one with `hookline keys create --tenant NAME`)",
            2,
        )
    return Client(url, api_key, timeout=90.0)


@contextlib.contextmanager
def _reported(client: Client) -> Iterator[None]:
    """A failed call as one line on stderr, and exit status 1."""
    try:
        yield
    except ClientError as exc:
        if exc.status is None:
            fail(str(exc))
        detail = exc.problem.get("detail", json.dumps(exc.problem))
        err_console.print(f"[red]error {exc.status}:[/red] {detail}")
        raise typer.Exit(1) from exc
    except httpx.HTTPError as exc:
        fail(f"cannot reach {client.url}: {exc}")


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
    console.print(table, soft_wrap=True)
    text = output_text(job)
    if text is not None:
        console.print(text, soft_wrap=True, markup=False)
    elif job.get("output") is not None:
        console.print_json(data=job["output"])


def submit(
    message: Annotated[
        list[str] | None,
        typer.Option(
            "--message", "-m", metavar="TEXT", help="A user message; repeat for a conversation."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", metavar="NAME", help="The model; the upstream that serves it runs the job."
        ),
    ] = None,
    operation: Annotated[
        str,
        typer.Option(
            "--operation",
            "-o",
            metavar="OPERATION",
            help="chat.completions, completions, embeddings or images.generations; any other "
            "operation an upstream declares takes its input from --file.",
        ),
    ] = "chat.completions",
    system: Annotated[
        str | None,
        typer.Option("--system", metavar="TEXT", help="chat.completions: a system message."),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            "--prompt", metavar="TEXT", help="completions and images.generations: the prompt."
        ),
    ] = None,
    text: Annotated[
        list[str] | None,
        typer.Option("--text", metavar="TEXT", help="embeddings: a text to embed (repeatable)."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", metavar="N", help="The most tokens the model may generate."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            metavar="FILE",
            help="A JSON file: a whole job ({operation, input, …}), or only its input.",
        ),
    ] = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option("--metadata", metavar="KEY=VALUE", help="Kept with the job (repeatable)."),
    ] = None,
    priority: Annotated[
        int,
        typer.Option("--priority", metavar="N", help="Higher runs first (batch items run at -10)."),
    ] = 0,
    ttl: Annotated[
        float | None,
        typer.Option(
            "--ttl", metavar="SECONDS", help="Expire the job if it has not started by then."
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            metavar="KEY",
            help="Submitting again with the same key gives back the first job, not a new one.",
        ),
    ] = None,
    webhook: Annotated[
        str | None,
        typer.Option(
            "--webhook",
            metavar="URL",
            help="POST the job's events there, signed (docs/webhooks.md); with --wait, report "
            "each delivery.",
        ),
    ] = None,
    events: Annotated[
        list[str] | None,
        typer.Option(
            "--events",
            metavar="TYPE",
            help="With --webhook: only these event types (repeatable; default: the job's end).",
        ),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Print the output as it is produced (resumes after a dropped connection).",
        ),
    ] = False,
    timeout: TimeoutOpt = 600,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job; --wait or --stream for its result.

    The job comes from the flags or a JSON file (--file). --webhook gets its events POSTed to a
    URL, signed; with --wait, each delivery attempt is reported too.
    """
    if events and not webhook:
        fail("--events filters the events of --webhook: give --webhook URL too", 2)
    fields = _job_fields(file, operation, model, message, system, prompt, text, max_tokens)
    fields["priority"] = priority
    if ttl is not None:
        fields["ttl_seconds"] = ttl
    if metadata:
        fields["metadata"] = dict(item.split("=", 1) for item in metadata if "=" in item)
    if webhook:
        fields["webhook"] = {"url": webhook, **({"events": events} if events else {})}
    deadline = time.monotonic() + timeout
    with _client(url, api_key) as client, _reported(client):
        job = client.submit(idempotency_key=idempotency_key, **fields)
        if stream:
            job = _follow(client, job.id, as_json=as_json)
        elif wait:
            job = _wait(client, job, timeout)
        delivered = True
        if webhook and (wait or stream) and job.done:
            delivered = _report_webhooks(client, job, deadline)
    if stream:
        _print_end(job, as_json=as_json)
    elif as_json:
        print_json(job.raw)
    elif wait:
        if job.status == "succeeded":
            text_out = output_text(job.raw)
            print(text_out if text_out is not None else json.dumps(job.output, indent=2))
        else:
            err_console.print(f"job {job.id} {job.status}: {json.dumps(job.error)}")
    else:
        print(f"{job.id} {job.status}")
    if (wait or stream) and (job.status != "succeeded" or not delivered):
        raise typer.Exit(1)


_JOB_FIELDS = ("operation", "input", "model", "webhook", "metadata", "priority", "ttl_seconds")


def _job_fields(
    file: Path | None,
    operation: str,
    model: str | None,
    messages: list[str] | None,
    system: str | None,
    prompt: str | None,
    texts: list[str] | None,
    max_tokens: int | None,
) -> dict[str, Any]:
    """The keyword arguments of Client.submit for the job the flags or the file describe."""
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            fail(f"cannot read {file}: {exc}", 2)
        if isinstance(loaded, dict) and "operation" in loaded and "input" in loaded:
            fields: dict[str, Any] = loaded
            unknown = sorted(set(fields) - set(_JOB_FIELDS))
            if unknown:
                fail(f"{file}: no job has the fields {unknown}", 2)
        else:
            fields = {"operation": operation, "input": loaded}
    else:
        request: dict[str, Any] = {}
        if operation == "chat.completions":
            chat = [{"role": "system", "content": system}] if system else []
            chat += [{"role": "user", "content": m} for m in messages or []]
            request["messages"] = chat
        elif operation in ("completions", "images.generations"):
            request["prompt"] = prompt or ""
        elif operation == "embeddings":
            request["input"] = texts or []
        else:
            fail(f"the input of a {operation} job comes from a file: --file FILE", 2)
        if max_tokens is not None and operation != "images.generations":
            request["max_tokens"] = max_tokens
        fields = {"operation": operation, "input": request}
    if model:
        fields["model"] = model
    return fields


def _wait(client: Client, job: Job, timeout: float) -> Job:
    """The job once it has ended, or as it is after ``timeout`` seconds."""
    with err_console.status(f"waiting for {job.id}…", spinner="dots"):
        try:
            return client.wait(job, timeout, raise_on_failure=False)
        except Timeout:
            return client.get(job)


def _follow(client: Client, job_id: str, *, as_json: bool) -> Job:
    """Print the job's output as it comes (``as_json``: each event and piece of text as a JSON
    line), until it ends; the job then. A dropped connection is resumed where it stopped."""
    attempt = 1
    for item in client.stream(job_id):
        if as_json:
            print(json.dumps(_item_json(item)), flush=True)
        elif isinstance(item, TextDelta):
            sys.stdout.write(item.text)
            sys.stdout.flush()
        elif item.type == "job.started" and item.data.get("attempt", 1) > attempt:
            attempt = item.data["attempt"]
            err_console.print(f"\n[yellow]attempt {attempt} starts over[/yellow]")
    return client.get(job_id)


def _item_json(item: Event | TextDelta) -> dict[str, Any]:
    if isinstance(item, TextDelta):
        return {"text": item.text, "index": item.index, "attempt": item.attempt}
    return {"id": item.id, "type": item.type, "seq": item.seq, "data": item.data}


def _print_end(job: Job, *, as_json: bool) -> None:
    """After a streamed output: the job as a last JSON line, or the end of the text and the
    job's status on stderr."""
    if as_json:
        print(json.dumps(job.raw))
        return
    print()
    line = f"{job.id} {job.status}"
    if job.error:
        line += f": {job.error.get('message')}"
    err_console.print(line, markup=False)


def _report_webhooks(client: Client, job: Job, deadline: float) -> bool:
    """Report each attempt of the job's webhook messages on stderr until every one is settled or
    ``deadline`` (monotonic) passes; whether all were delivered."""
    told: dict[str, int] = {}  # message id -> attempts reported
    deliveries: Sequence[Delivery] = ()
    with err_console.status("waiting for the webhook…", spinner="dots"):
        while True:
            deliveries = client.deliveries(job)  # all written when the job ended
            for delivery in deliveries:
                if delivery.attempts > told.get(delivery.id, 0):
                    told[delivery.id] = delivery.attempts
                    err_console.print(_attempt_line(delivery), markup=False)
            if all(delivery.settled for delivery in deliveries):
                break
            if time.monotonic() >= deadline:
                err_console.print(
                    f"the webhook is still pending: GET /v1/deliveries?job_id={job.id}",
                    markup=False,
                )
                return False
            time.sleep(0.2)
    return all(delivery.status == "succeeded" for delivery in deliveries)


def _attempt_line(delivery: Delivery) -> str:
    where = f"webhook {delivery.event_type} → {delivery.url}"
    if delivery.status == "succeeded":
        return f"{where}: delivered ({delivery.last_status_code}), attempt {delivery.attempts}"
    outcome = delivery.last_error or f"answered {delivery.last_status_code}"
    line = f"{where}: attempt {delivery.attempts} failed ({outcome})"
    if delivery.status == "failed":
        return f"{line}; given up"
    if delivery.next_attempt_at:
        at = datetime.datetime.fromisoformat(delivery.next_attempt_at.replace("Z", "+00:00"))
        return f"{line}; next at {at.astimezone().strftime('%H:%M:%S')}"
    return line


def jobs_list(
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help="Only jobs in this status (repeatable): queued, running, succeeded, failed, "
            "cancelled, expired.",
        ),
    ] = None,
    operation: Annotated[
        list[str] | None,
        typer.Option("--operation", metavar="OPERATION", help="Only this operation (repeatable)."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", help="How many, newest first (at most 100).")
    ] = 20,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List your most recent jobs, newest first.

    Ids come first and whole, to paste into `hookline jobs show`.
    """
    with _client(url, api_key) as client, _reported(client):
        page = client.list_page(status=status, operation=operation, limit=limit)
    if as_json:
        print_json(page.raw)
        return
    rows = [
        [job.id, job.status, job.operation, job.model, str(job.attempts), job.raw["created_at"]]
        for job in page.jobs
    ]
    print_columns(["id", "status", "operation", "model", "attempts", "created_at"], rows)


def jobs_show(
    job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Show one job and its output."""
    with _client(url, api_key) as client, _reported(client):
        job = client.get(job_id)
    if as_json:
        print_json(job.raw)
    else:
        _print_job(job.raw)


def jobs_tail(
    job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Print a job's output as it comes, then its final status."""
    with _client(url, api_key) as client, _reported(client):
        job = _follow(client, job_id, as_json=as_json)
    _print_end(job, as_json=as_json)
    if job.status != "succeeded":
        raise typer.Exit(1)


def jobs_cancel(
    job_id: JobIdArg, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Cancel a job.

    A queued job is cancelled at once; a running one has its upstream call aborted.
    """
    with _client(url, api_key) as client, _reported(client):
        job = client.cancel(job_id)
    if as_json:
        print_json(job.raw)
    else:
        print(f"{job.id} {job.status}")


def listen(
    forward_to: Annotated[
        str,
        typer.Option(
            "--forward-to",
            metavar="URL",
            help="The local URL to deliver to, e.g. http://localhost:3000/hook",
        ),
    ],
    events: Annotated[
        list[str] | None,
        typer.Option("--events", metavar="TYPE", help="Only these event types (repeatable)."),
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state-file",
            metavar="FILE",
            help="Where the resume point is kept.  [default: under ~/.cache/hookline]",
        ),
    ] = None,
    max_events: Annotated[
        int | None,
        typer.Option("--max-events", metavar="N", help="Stop after this many deliveries."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per delivery, for scripts.")
    ] = False,
) -> None:
    """Forward your events to a local URL, signed as webhooks are.

    For development without a public URL (with `hookline serve --dev` the gateway can deliver to
    localhost itself); resumes where it stopped.
    """
    from hookline.client.listen import Forwarded, Listener, default_state_file

    def report(forwarded: Forwarded) -> None:
        if as_json:
            print(json.dumps(forwarded.__dict__), flush=True)
            return
        if forwarded.status is None:
            outcome = f"[red]failed[/red] {forwarded.error}"
        elif 200 <= forwarded.status < 300:
            outcome = f"[green]{forwarded.status}[/green] {forwarded.millis:.0f} ms"
        else:
            outcome = f"[yellow]{forwarded.status}[/yellow] {forwarded.millis:.0f} ms"
        console.print(f"{forwarded.type:<18} {forwarded.subject}  → {outcome}", soft_wrap=True)

    with _client(url, api_key) as client:
        assert api_key is not None
        state = state_file or default_state_file(url, api_key, forward_to)
        listener = Listener(client, forward_to, events=events, state_file=state)
        err_console.print(f"forwarding events of {url} to {forward_to} (Ctrl-C to stop)")
        try:
            listener.run(report, limit=max_events)
        except ClientError as exc:
            fail(str(exc))


def webhook_secret(
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Print your tenant's webhook signing secret (whsec_…).

    Your receiver verifies each webhook with it (docs/webhooks.md).
    """
    with _client(url, api_key) as client, _reported(client):
        secret = client.webhook_secret()
    if as_json:
        print_json({"object": "webhook_secret", "secret": secret})
    else:
        print(secret)


def batch_submit(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A JSONL file: one {custom_id, method, url, body} a line."
        ),
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(
            "--endpoint", metavar="PATH", help="/v1/chat/completions, …  [default: the lines' url]"
        ),
    ] = None,
    completion_window: Annotated[
        str,
        typer.Option(
            "--completion-window", metavar="WINDOW", help="How long the batch may take (24h)."
        ),
    ] = "24h",
    webhook_url: Annotated[
        str | None,
        typer.Option("--webhook-url", metavar="URL", help="Called once, when the batch ends."),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show its progress until it ends.")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a batch of requests; --wait shows its progress.

    The file is streamed, whatever its size.
    """
    if not file.is_file():
        fail(f"no file {file}", 2)
    with _client(url, api_key) as client, _reported(client):
        batch = client.submit_batch(
            file, endpoint=endpoint, webhook=webhook_url, completion_window=completion_window
        )
        if batch.status == "failed":
            _print_batch_errors(batch)
            raise typer.Exit(1)
        if wait:
            batch = _follow_batch(client, batch)
    if as_json:
        print_json(batch.raw)
    else:
        print(
            f"{batch.id} {batch.status}: {batch.completed} completed, "
            f"{batch.failed} failed of {batch.total}"
        )
    if wait and batch.status != "completed":
        raise typer.Exit(1)


def _print_batch_errors(batch: Batch) -> None:
    err_console.print(f"[red]batch {batch.id} failed validation; nothing ran:[/red]")
    for error in batch.errors:
        err_console.print(f"  line {error['line']}: {error['message']}", markup=False)


def _follow_batch(client: Client, batch: Batch) -> Batch:
    """Read the batch every second under a rich progress bar until it ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress("{task.description}", *columns, console=err_console) as progress:
        task = progress.add_task(batch.id, total=batch.total or None)
        while not batch.done:
            time.sleep(1)
            batch = client.get_batch(batch.id)
            progress.update(
                task,
                completed=batch.completed + batch.failed,
                total=batch.total or None,
                description=f"{batch.id} {batch.status}",
            )
    return batch


def batch_results(
    batch_id: Annotated[str, typer.Argument(metavar="BATCH_ID", help="The batch's id (batch_…).")],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", metavar="FILE", help="Where to write the results."),
    ],
    errors: Annotated[
        Path | None,
        typer.Option("--errors", metavar="FILE", help="Where to write the failed items' lines."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a finished batch's results.

    Its output file, and its error file with --errors: JSONL in OpenAI's Batch format.
    """
    with _client(url, api_key) as client, _reported(client):
        batch = client.get_batch(batch_id)
        if not batch.done:
            fail(f"batch {batch_id} is still {batch.status}")
        written = [_download(client, batch.output_file_id, output)]
        if errors is not None:
            written.append(_download(client, batch.error_file_id, errors))
    if as_json:
        files = [{"path": str(path), "lines": lines} for path, lines in written]
        print_json({"id": batch_id, "status": batch.status, "files": files})
        return
    print(f"{batch_id} {batch.status}: " + ", ".join(f"{n} lines to {p}" for p, n in written))


def _download(client: Client, file_id: str | None, path: Path) -> tuple[Path, int]:
    """Stream a file to ``path`` (empty when the batch has no such file); its line count."""
    lines = 0
    with path.open("wb") as handle:
        if file_id is None:
            return path, 0
        try:
            for chunk in client.file_content(file_id):
                handle.write(chunk)
                lines += chunk.count(b"\n")
        except ClientError as exc:
            fail(f"{exc.status}: {file_id}")
    return path, lines
