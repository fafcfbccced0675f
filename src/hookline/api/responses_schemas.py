"""The bodies of OpenAI's Responses API as :mod:`hookline.api.responses` takes and gives them: the
request is checked against :class:`ResponseCreate` (strictly: ``"5"`` is not a number), and the
answers are described here for the OpenAPI spec. Fields of OpenAI's API that hookline does not
read are allowed and ignored; those it cannot honour (``tools``, ``conversation``, ``prompt``)
are refused by name."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_OPEN = ConfigDict(extra="allow", strict=True)


class InputText(BaseModel):
    model_config = _OPEN
    type: Literal["input_text"]
    text: str


class InputImage(BaseModel):
    model_config = _OPEN
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, description="A URL or a data: URL.")
    file_id: str | None = Field(default=None, description="Not supported: give image_url.")
    detail: Literal["low", "high", "auto", "original"] = "auto"


class OutputText(BaseModel):
    model_config = _OPEN
    type: Literal["output_text"]
    text: str


class Refusal(BaseModel):
    model_config = _OPEN
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | InputImage | OutputText | Refusal, Field(discriminator="type")]


class InputMessage(BaseModel):
    """A message of the conversation (an earlier response's output message included)."""

    model_config = _OPEN
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(BaseModel):
    model_config = _OPEN
    format: TextFormat | None = None


class ResponseCreate(BaseModel):
    """OpenAI's request to create a response (``POST /v1/responses``)."""

    model_config = _OPEN

    # At most the 256 characters the store keeps, as for a job's model.
    model: str = Field(min_length=1, max_length=256, description="Routes to an upstream.")
    input: str | list[InputMessage] = Field(description="Text, or message items.")
    instructions: str | None = Field(
        default=None, description="A system message ahead of the input (not carried over)."
    )
    previous_response_id: str | None = Field(
        default=None, max_length=64, description="Continue this stored response's conversation."
    )
    max_output_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    stream: bool | None = Field(default=None, description="Answer with OpenAI's streaming events.")
    background: bool | None = Field(default=None, description="Answer at once, status queued.")
    store: bool | None = Field(
        default=None, description="false: not retrievable, nor continued (no background)."
    )
    user: str | None = Field(default=None, max_length=256)
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None, max_length=0, description="Not supported: tools, if given, are empty."
    )

    @field_validator("tools", mode="before")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if isinstance(value, list) and value:
            raise ValueError("tools are not supported: responses run as chat completions")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError("metadata keys are at most 64 characters, values 512")
        return value


# --- answers (described for the spec; the routes answer plain JSON)


class OutputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[dict[str, Any]]


class ResponseObject(BaseModel):
    """OpenAI's Response object."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="resp_…; its job is job_… with the same suffix.")
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: bool
    completed_at: int | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str
    tools: list[dict[str, Any]]
    top_p: float
    truncation: str
    usage: dict[str, Any] | None
    user: str | None = Field(default=None, description="Present only when the request gave one.")


class InputItem(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["message"]
    role: str
    content: list[dict[str, Any]]
    status: str


class InputItemList(BaseModel):
    object: Literal["list"]
    data: list[InputItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"]
    deleted: Literal[True]
