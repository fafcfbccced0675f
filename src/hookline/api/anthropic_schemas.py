"""Anthropic's Messages request and AnthropicMessage, as the front door (:mod:`hookline.api.anthropic_compat`)
checks and documents them: the fields hookline reads. Other fields are allowed and ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_OPEN = ConfigDict(extra="allow")


class AnthropicTextBlock(BaseModel):
    model_config = _OPEN

    type: Literal["text"]
    text: str


class AnthropicImageSource(BaseModel):
    model_config = _OPEN

    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None


class AnthropicImageBlock(BaseModel):
    model_config = _OPEN

    type: Literal["image"]
    source: AnthropicImageSource


class AnthropicToolUseBlock(BaseModel):
    model_config = _OPEN

    type: Literal["tool_use"]
    id: str = Field(max_length=256)
    name: str = Field(max_length=256)
    input: dict[str, Any]


class AnthropicToolResultBlock(BaseModel):
    model_config = _OPEN

    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=256)
    content: str | list[AnthropicTextBlock | AnthropicImageBlock] | None = None
    is_error: bool | None = None


class AnthropicOtherBlock(BaseModel):
    """A block hookline does not translate (``document``, ``thinking``, …): refused with a 400."""

    model_config = _OPEN

    type: str


AnthropicBlock = Annotated[
    AnthropicTextBlock
    | AnthropicImageBlock
    | AnthropicToolUseBlock
    | AnthropicToolResultBlock
    | AnthropicOtherBlock,
    Field(union_mode="left_to_right"),
]


class AnthropicInputMessage(BaseModel):
    model_config = _OPEN

    role: Literal["user", "assistant"]
    content: str | Annotated[list[AnthropicBlock], Field(min_length=1)]


class AnthropicTool(BaseModel):
    model_config = _OPEN

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]


class AnthropicToolChoice(BaseModel):
    model_config = _OPEN

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class AnthropicMessageCreate(BaseModel):
    """Anthropic's Messages request (``POST /v1/messages``)."""

    model_config = _OPEN

    model: str = Field(min_length=1, max_length=256, description="Routes the job to an upstream.")
    max_tokens: int = Field(ge=1, le=2**31 - 1)
    messages: list[AnthropicInputMessage] = Field(min_length=1)
    system: str | list[AnthropicTextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    stream: bool | None = Field(
        default=None, description="Answer with Anthropic's streaming events (SSE)."
    )


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class AnthropicMessage(BaseModel):
    """Anthropic's AnthropicMessage: the answer."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: AnthropicUsage
