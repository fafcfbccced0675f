"""What a caller sends, as a job: the response's ids, the fields its job keeps, and the
Responses request as the job's chat request (and back, as input items)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import orjson

from hookline.errors import InvalidRequest
from hookline.ids import has_prefix
from hookline.jobs import Job

VIA = "responses"  # job.metadata["via"] of a response's job
_FIELDS_KEY = "response"  # job.metadata[...]: its ResponseFields, JSON


class ResponseRequestError(InvalidRequest):
    """A Responses request hookline cannot run, with the parameter OpenAI's error names."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


# --- ids


def response_id(job_id: str) -> str:
    return "resp_" + job_id.removeprefix("job_")


def job_id_of(response: str) -> str | None:
    """The job of a response id, or None when ``response`` is not one."""
    return "job_" + response[5:] if has_prefix(response, "resp") else None


def message_id(job_id: str) -> str:
    """The id of the response's output message."""
    return "msg_" + job_id.removeprefix("job_")


def input_item_id(job_id: str, index: int) -> str:
    return f"{message_id(job_id)}_{index}"


# --- what the job keeps


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseFields:
    """What a Response object echoes that its chat request does not hold. ``history``: how many
    messages, after the instructions' system message, came from the previous response."""

    instructions: str | None = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    previous_response_id: str | None = None
    background: bool = False
    store: bool = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    text_format: Mapping[str, Any] | None = None
    history: int = 0

    def as_metadata(self) -> dict[str, str]:
        """The job's metadata (sorted keys: a retry's fingerprint matches the first call's)."""
        fields = {**dataclasses.asdict(self), "metadata": dict(self.metadata)}
        return {"via": VIA, _FIELDS_KEY: orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()}

    @property
    def lead(self) -> int:
        """How many of the job's messages precede this response's own input."""
        return (1 if self.instructions else 0) + self.history


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ResponseFields))


def fields_of(job: Job) -> ResponseFields | None:
    """The response fields of a response's job; None for any other job."""
    if job.metadata.get("via") != VIA:
        return None
    try:
        stored = orjson.loads(job.metadata.get(_FIELDS_KEY, ""))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(stored, dict):  # a job made to look like one, by hand
        return None
    try:  # (fields a later version added are left out)
        return ResponseFields(**{k: v for k, v in stored.items() if k in _FIELD_NAMES})
    except TypeError:
        return None


# --- the request, as a chat completion


def chat_request(
    request: Mapping[str, Any], previous: tuple[Job, ResponseFields] | None = None
) -> tuple[dict[str, Any], ResponseFields]:
    """The chat request (the job's input, without ``model``) and the fields to keep, for a
    Responses request already checked against its schema. ``previous``: the response that
    ``previous_response_id`` names (its conversation comes first; its instructions do not)."""
    messages: list[dict[str, Any]] = []
    instructions = request.get("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    history: list[dict[str, Any]] = []
    if previous is not None:
        job, fields = previous
        history = list(job.input.get("messages", [])[1 if fields.instructions else 0 :])
        text = output_text(job)
        if text is not None:
            history.append({"role": "assistant", "content": text})
    messages += history
    given = request["input"]
    items = [{"role": "user", "content": given}] if isinstance(given, str) else given
    messages += [_message(item, f"input[{i}]") for i, item in enumerate(items)]
    if len(messages) == len(history) + (1 if instructions else 0):
        raise ResponseRequestError("input holds no message", param="input")
    chat: dict[str, Any] = {"messages": messages}
    for ours, theirs in [("max_output_tokens", "max_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p"), ("user", "user")]:  # fmt: skip
        if request.get(ours) is not None:
            chat[theirs] = request[ours]
    text_format = (request.get("text") or {}).get("format")
    if text_format and text_format.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif text_format and text_format.get("type") == "json_schema":
        schema = {k: text_format[k] for k in ("name", "schema", "strict", "description")
                  if text_format.get(k) is not None}  # fmt: skip
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    fields = ResponseFields(
        instructions=instructions,
        metadata=dict(request.get("metadata") or {}),
        previous_response_id=request.get("previous_response_id"),
        background=bool(request.get("background")),
        store=request.get("store") is not False,
        max_output_tokens=request.get("max_output_tokens"),
        temperature=request.get("temperature"),
        top_p=request.get("top_p"),
        user=request.get("user"),
        text_format=text_format,
        history=len(history),
    )
    return chat, fields


def _message(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    """One input message item as a chat message (``developer`` speaks as ``system``, which
    every chat template knows)."""
    role = "system" if item["role"] == "developer" else item["role"]
    content = item["content"]
    if isinstance(content, str):
        return {"role": role, "content": content}
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part["type"]
        if kind in ("input_text", "output_text"):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            parts.append({"type": "text", "text": part["refusal"]})
        elif part.get("image_url"):  # input_image
            image = {"url": part["image_url"], "detail": part.get("detail") or "auto"}
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise ResponseRequestError(
                "an input_image needs an image_url (file ids are not supported)",
                param=f"{where}.content[{i}].image_url",
            )
    if len(parts) == 1 and parts[0]["type"] == "text":  # what every upstream takes
        return {"role": role, "content": parts[0]["text"]}
    return {"role": role, "content": parts}


def input_items(job: Job, fields: ResponseFields) -> list[dict[str, Any]]:
    """The response's own input messages (not the instructions, nor the previous response's
    conversation) as Responses input items."""
    items = []
    for index, message in enumerate(job.input.get("messages", [])[fields.lead :]):
        role = message.get("role")
        assistant = role == "assistant"
        content = message.get("content")
        given = content if isinstance(content, list) else [{"type": "text", "text": content}]
        text_type = "output_text" if assistant else "input_text"
        parts: list[dict[str, Any]] = []
        for part in given:
            if part.get("type") == "image_url":
                image = part.get("image_url") or {}
                parts.append({"type": "input_image", "image_url": image.get("url"),
                              "detail": image.get("detail", "auto"), "file_id": None})  # fmt: skip
            else:
                parts.append({"type": text_type, "text": part.get("text") or ""})
                if assistant:
                    parts[-1]["annotations"] = []
        items.append({"id": input_item_id(job.id, index), "type": "message", "role": role,
                      "content": parts, "status": "completed"})  # fmt: skip
    return items


# --- the answer


def output_text(job: Job) -> str | None:
    """The text of the job's answer, or None when it has none."""
    message = choice_of(job).get("message") or {}
    content = message.get("content")
    return content if isinstance(content, str) else None


def choice_of(job: Job) -> dict[str, Any]:
    """The first choice of the job's chat answer (empty when it has none)."""
    choices = (job.output or {}).get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    return first if isinstance(first, dict) else {}
