"""The OpenAI request and response bodies the facade (:mod:`hookline.api.openai_compat`) takes and
gives, for the OpenAPI spec: the fields of OpenAI's API that hookline reads or relays. Other fields
are allowed and go to the upstream as they came (vLLM's, Ollama's, …).

A request to the facade, and a job's ``input`` (:class:`hookline.api.schemas.JobCreate`), is
held to the types these models give its fields (:data:`REQUEST_MODELS`, strictly: ``"5"`` is not a
number), so that what no upstream takes is a 422 before it is a job (about 8 µs a request). The
upstream judges the rest, and a refusal of its comes back with its status.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Other fields go as they came; the ones named here must have the JSON type the spec gives ("5"
# is not a number: strict).
_OPEN = ConfigDict(extra="allow", strict=True)

# Text, texts, token ids, or lists of token ids: a list is not empty.
_Input = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[int], Field(min_length=1)]
    | Annotated[list[list[int]], Field(min_length=1)]
)


class StreamOptions(BaseModel):
    model_config = _OPEN

    include_usage: bool | None = Field(
        default=None, description="End the stream with a chunk holding the usage."
    )


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = _OPEN

    role: str = Field(description="system, developer, user, assistant, tool, …")
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or content parts (text, image_url, input_audio, …)."
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(BaseModel):
    model_config = _OPEN

    model: str = Field(min_length=1, max_length=256, description="Routes the job to an upstream.")
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool | None = Field(
        default=None,
        description="Answer with Server-Sent Events: OpenAI's chunks, then `data: [DONE]`.",
    )
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    """OpenAI's chat completion request (``POST /v1/chat/completions``)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """OpenAI's (legacy) completion request (``POST /v1/completions``)."""

    prompt: _Input = Field(description="Text, texts, or token ids.")
    suffix: str | None = None
    echo: bool | None = None
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (``POST /v1/embeddings``)."""

    model_config = _OPEN

    model: str = Field(min_length=1, max_length=256, description="Routes the job to an upstream.")
    input: _Input = Field(description="Text, texts, or token ids.")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class ImageGenerationRequest(BaseModel):
    """OpenAI's image generation request (``POST /v1/images/generations``)."""

    model_config = _OPEN

    model: str = Field(min_length=1, max_length=256, description="Routes the job to an upstream.")
    prompt: str = Field(min_length=1)
    n: int | None = Field(default=None, ge=1, le=10)
    size: str | None = None
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    output_format: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None


class UpstreamAnswer(BaseModel):
    """The upstream's answer in OpenAI's format (``chat.completion``, ``text_completion`` or an
    embeddings ``list``), relayed as it came."""

    model_config = _OPEN

    id: str | None = None
    object: str | None = None
    created: Any = None
    model: str | None = None
    choices: list[dict[str, Any]] | None = None
    data: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None


# The request model of each operation that has one, by its name (a passthrough operation has none:
# its body goes as it came).
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "chat.completions": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "images.generations": ImageGenerationRequest,
}
