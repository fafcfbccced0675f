"""Batches: thousands of requests in one call, in OpenAI's Batch format, run as jobs.

A batch is an input file of JSONL lines ``{custom_id, method, url, body}``. Creating it checks
every line first (JSON within a request's limits, a unique ``custom_id``, a supported ``url``
matching the batch's endpoint, a model some upstream serves): one bad line fails the whole batch
with errors naming the lines, and nothing runs. Then each line becomes a job (an *item*:
``jobs.batch_id``, ``batch_line``, ``custom_id``), queued below interactive work (``[batches]
item_priority``) so a big batch never starves interactive callers, under the same upstream
limits. A request that is refused or fails leaves nothing behind: what it wrote is taken back.

A batch's events (``batch.progress``, then one of ``batch.completed``, ``batch.failed``,
``batch.cancelled``, ``batch.expired``) are in the event log under the batch's id, carried by an
*anchor* row in ``jobs`` (operation ``batch``, lease ``batch``, no upstream: never claimed, hidden
from the job API). So the tenant stream, SSE and webhooks serve batches exactly as they serve jobs.

:class:`BatchRunner` (in every worker process) leases the active batches, one runner each: it
counts their items, records throttled progress, cancels the queued items of a cancelled or expired
batch, and once every item has ended writes the output and error files (in input order, streamed)
and the terminal event. All of it is derived from the rows, so a restart anywhere continues; a
batch whose items it cannot write ends failed.
"""

from hookline.batches.format import BatchRequest, batch_json, file_json, result_line
from hookline.batches.runner import BatchRunner
from hookline.batches.service import BatchService, Unqueueable

__all__ = [
    "BatchRequest",
    "BatchRunner",
    "BatchService",
    "Unqueueable",
    "batch_json",
    "file_json",
    "result_line",
]
