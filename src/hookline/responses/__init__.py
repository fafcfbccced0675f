"""OpenAI's Responses API on hookline's jobs: what a response is, in and out.

A response is a ``chat.completions`` job, so any upstream serves it. :func:`chat_request` turns
the Responses request (``input``, ``instructions``, ``max_output_tokens``, the conversation of a
``previous_response_id``) into the job's chat request; :func:`response_json` turns the job back
into OpenAI's Response object, its output into a ``message`` item. What the Response object
echoes but a chat request does not hold (the instructions, the caller's metadata, ``background``,
``store``, …) stays with the job, as :class:`ResponseFields` in its metadata (``via:
responses``). A response's id is its job's with another prefix (``resp_01J…`` is ``job_01J…``).

:class:`ResponseEvents` numbers a response's streaming events so that every replay numbers them
alike, whatever chunks the upstream's text came in, and :func:`webhook_message` names the
``response.*`` webhook that a response's terminal job event also reports.
"""

from hookline.responses.events import ResponseEvents
from hookline.responses.request import (
    VIA,
    ResponseFields,
    ResponseRequestError,
    chat_request,
    fields_of,
    input_items,
    job_id_of,
    message_id,
    output_text,
    response_id,
)
from hookline.responses.response import (
    WEBHOOK_EVENT_TYPES,
    response_json,
    status_of,
    webhook_message,
)

__all__ = [
    "VIA",
    "WEBHOOK_EVENT_TYPES",
    "ResponseEvents",
    "ResponseFields",
    "ResponseRequestError",
    "chat_request",
    "fields_of",
    "input_items",
    "job_id_of",
    "message_id",
    "output_text",
    "response_id",
    "response_json",
    "status_of",
    "webhook_message",
]
