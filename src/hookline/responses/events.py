"""A response's streaming events, numbered alike on every replay."""

from __future__ import annotations

from typing import Any

from hookline.jobs import Job, JobStatus
from hookline.responses.request import ResponseFields, message_id, output_text, response_id
from hookline.responses.response import output_item, response_json, status_of


class ResponseEvents:
    """One stream's Responses events, built from what the job's stream brings: each call gives
    the events to send (those numbered after ``starting_after``).

    Every replay numbers the events alike: ``response.created`` is 0, ``response.queued`` 1
    (background responses), ``response.in_progress`` 2, the message's ``output_item.added`` 3
    and its ``content_part.added`` 4; an ``output_text.delta`` is numbered 4 plus the position in
    the text where it ends, so whatever chunks the text arrives in, resuming after N resumes
    after character N - 4, exactly. With the text L characters long, ``output_text.done`` is
    5 + L, ``content_part.done`` 6 + L, ``output_item.done`` 7 + L and ``response.completed``
    (or ``response.incomplete``) 8 + L. A response that fails or is cancelled ends with
    ``response.failed`` or ``response.cancelled`` numbered after the last text sent.
    """

    PART_ADDED = 4

    def __init__(self, job: Job, fields: ResponseFields, starting_after: int | None) -> None:
        self.job = job
        self.fields = fields
        self.after = -1 if starting_after is None else starting_after
        self.sent = max(0, self.after - self.PART_ADDED)  # characters the caller has
        self.seen = 0  # characters of the current attempt that exist
        self.attempt = job.attempts  # deltas of earlier attempts were superseded
        self.started = False
        self.streamed = False  # text went out on this stream
        self.ended = False

    def _event(self, number: int, kind: str, **fields: Any) -> list[dict[str, Any]]:
        if number <= self.after:
            return []
        return [{"type": kind, "sequence_number": number, **fields}]

    def _item_fields(self) -> dict[str, Any]:
        return {"item_id": message_id(self.job.id), "output_index": 0, "content_index": 0}

    def opening(self, *, running: bool = False) -> list[dict[str, Any]]:
        """The first events; ``running``: the job is known to have started (its
        ``job.started`` will not come)."""
        status = "queued" if self.fields.background else "in_progress"
        out = self._event(0, "response.created", response=self._snapshot(status))
        if self.fields.background:
            out += self._event(1, "response.queued", response=self._snapshot("queued"))
        return out + (self.started_attempt(self.job.attempts) if running else [])

    def started_attempt(self, attempt: int) -> list[dict[str, Any]]:
        """An attempt of the job started: a retry after text went out on this stream ends it
        with an ``error`` event (the text sent is not the start of the new answer)."""
        out: list[dict[str, Any]] = []
        if attempt > self.attempt:
            if self.streamed:
                return self._end("error", code="upstream_retry", param=None, message=(
                    f"the upstream broke off and {response_id(self.job.id)} started over; its "
                    "answer is at GET /v1/responses/{id} once it completes"))  # fmt: skip
            self.attempt, self.seen = attempt, 0
        if not self.started:
            self.started = True
            item = {"id": message_id(self.job.id), "type": "message", "status": "in_progress",
                    "role": "assistant", "content": []}  # fmt: skip
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event(2, "response.in_progress", response=self._snapshot("in_progress"))
            out += self._event(3, "response.output_item.added", output_index=0, item=item)
            out += self._event(4, "response.content_part.added", part=part, **self._item_fields())
        return out

    def delta(self, attempt: int, index: int, offset: int, text: str) -> list[dict[str, Any]]:
        """Output text: ``text`` at ``offset`` in the answer of ``attempt``."""
        if index != 0 or attempt < self.attempt or self.ended:
            return []
        out = self.started_attempt(attempt) if attempt > self.attempt or not self.started else []
        if self.ended:
            return out
        end = offset + len(text)
        self.seen = max(self.seen, end)
        if end <= self.sent:
            return out
        piece = text[max(0, self.sent - offset) :]
        self.sent, self.streamed = end, True
        return out + self._event(
            self.PART_ADDED + end, "response.output_text.delta", delta=piece, logprobs=[],
            **self._item_fields(),
        )  # fmt: skip

    def finished(self, job: Job) -> list[dict[str, Any]]:
        """The job ended (``job``: as it ended): the closing events."""
        self.job = job
        if job.status is not JobStatus.SUCCEEDED:
            kind = "response.cancelled" if job.status is JobStatus.CANCELLED else "response.failed"
            return self._end(kind, response=response_json(job, self.fields))
        out = [] if self.started else self.started_attempt(self.attempt)
        text = output_text(job) or ""
        if self.sent < len(text):  # not streamed (or not all): the rest in one delta
            out += self.delta(self.attempt, 0, self.sent, text[self.sent :])
        base = max(len(text), self.seen)
        item = output_item(job)
        part = item["content"][0] if item["content"] else {"type": "output_text", "text": ""}
        kind = "response.incomplete" if status_of(job) == "incomplete" else "response.completed"
        out += self._event(base + 5, "response.output_text.done", text=text, logprobs=[],
                           **self._item_fields())  # fmt: skip
        out += self._event(base + 6, "response.content_part.done", part=part,
                           **self._item_fields())  # fmt: skip
        out += self._event(base + 7, "response.output_item.done", output_index=0, item=item)
        out += self._event(base + 8, kind, response=response_json(job, self.fields))
        self.ended = True
        return out

    def _end(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        self.ended = True
        # Numbered after all the text the caller has (and may have had live, before the store).
        return self._event(self.PART_ADDED + 1 + max(self.seen, self.sent), kind, **fields)

    def _snapshot(self, status: str) -> dict[str, Any]:
        return response_json(self.job, self.fields, status)
