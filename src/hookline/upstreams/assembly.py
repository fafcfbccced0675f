"""Reassemble streamed OpenAI chunks into the object a non-streaming call would have returned.

``chat.completion.chunk`` → ``chat.completion`` and streamed ``text_completion`` → ``text_completion``,
including tool-call fragments (concatenated by index), finish reasons, logprobs and the usage chunk.
"""

from __future__ import annotations

from typing import Any

from hookline.jobs import Operation
from hookline.upstreams.base import DeltaSink, bad_response

_HEADER_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")


class StreamAssembler:
    def __init__(self, operation: Operation, on_delta: DeltaSink) -> None:
        self.operation = operation
        self.on_delta = on_delta
        self.header: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.finished = False
        self._chat = operation is Operation.CHAT_COMPLETIONS
        self._sent: dict[int, int] = {}  # per choice, how many text parts went to on_delta

    def feed(self, *chunks: dict[str, Any]) -> None:
        """Take chunks that arrived together: their text goes to ``on_delta`` once per choice
        (a burst of a fast upstream is one live delta, not hundreds)."""
        if not chunks:
            return
        texts = []
        try:
            self._take(chunks)
            for index, state in self.choices.items():
                parts = state["text"]
                sent = self._sent.get(index, 0)
                if len(parts) > sent:
                    self._sent[index] = len(parts)
                    texts.append((index, "".join(parts[sent:])))
        except (AttributeError, TypeError, ValueError) as exc:  # JSON, but not chunks
            raise bad_response(f"it sent an event that is not a chunk: {exc!r}"[:300]) from exc
        for index, text in texts:
            self.on_delta(index, text)

    def _take(self, chunks: tuple[dict[str, Any], ...]) -> None:
        header = self.header
        for key in _HEADER_KEYS:  # the last value given wins: looked up from the end, once
            for chunk in reversed(chunks):
                value = chunk.get(key)
                if value is not None:
                    header[key] = value
                    break
        chat, choices = self._chat, self.choices
        for chunk in chunks:
            usage = chunk.get("usage")
            if usage:
                self.usage = usage
            for choice in chunk.get("choices") or ():
                # The common chunk, a piece of a known choice's text and nothing else, goes short.
                delta = choice.get("delta")
                if (
                    chat
                    and choice.get("finish_reason") is None
                    and choice.get("logprobs") is None
                    and delta is not None
                    and len(delta) == 1
                    and (content := delta.get("content")) is not None
                    and (state := choices.get(choice.get("index"))) is not None
                ):
                    if content:
                        state["text"].append(content)
                    continue
                self._take_choice(choice)

    def _take_choice(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index", 0))
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = {"index": index, "text": [], "tools": {}}
        if self._chat:
            self._feed_chat(state, choice)
        else:
            text = choice.get("text")
            if text:
                state["text"].append(text)
        logprobs = choice.get("logprobs")
        if logprobs is not None:
            state.setdefault("logprobs", []).append(logprobs)
        finish_reason = choice.get("finish_reason")
        if finish_reason:
            state["finish_reason"] = finish_reason
            self.finished = True

    def _feed_chat(self, state: dict[str, Any], choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if not delta:
            return
        content = delta.get("content")
        if content:
            state["text"].append(content)
        if len(delta) == (1 if content is not None else 0):
            return  # the common chunk: text only
        role = delta.get("role")
        if role:
            state["role"] = role
        refusal = delta.get("refusal")
        if refusal:
            state["refusal"] = state.get("refusal", "") + refusal
        for call in delta.get("tool_calls") or ():
            slot = state["tools"].setdefault(
                int(call.get("index", 0)),
                {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
            )
            if call.get("id"):
                slot["id"] = call["id"]
            function = call.get("function") or {}
            slot["function"]["name"] += function.get("name") or ""
            slot["function"]["arguments"] += function.get("arguments") or ""

    def result(self) -> dict[str, Any]:
        choices = [self._choice(self.choices[i]) for i in sorted(self.choices)]
        obj = (
            "chat.completion" if self.operation is Operation.CHAT_COMPLETIONS else "text_completion"
        )
        result: dict[str, Any] = {
            "id": self.header.get("id"),
            "object": obj,
            "created": self.header.get("created"),
            "model": self.header.get("model"),
            "choices": choices,
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in self.header:
                result[key] = self.header[key]
        if self.usage is not None:
            result["usage"] = self.usage
        return result

    def _choice(self, state: dict[str, Any]) -> dict[str, Any]:
        text = "".join(state["text"])
        logprobs = _merge_logprobs(state.get("logprobs"))
        if self.operation is not Operation.CHAT_COMPLETIONS:
            return {
                "index": state["index"],
                "text": text,
                "logprobs": logprobs,
                "finish_reason": state.get("finish_reason"),
            }
        # refusal is required by OpenAI's schema of a chat completion message (null: none).
        message: dict[str, Any] = {
            "role": state.get("role", "assistant"),
            "content": text or None,
            "refusal": state.get("refusal") or None,
        }
        if state["tools"]:
            message["tool_calls"] = [state["tools"][i] for i in sorted(state["tools"])]
        return {
            "index": state["index"],
            "message": message,
            "logprobs": logprobs,
            "finish_reason": state.get("finish_reason"),
        }


def _merge_logprobs(parts: list[Any] | None) -> Any:
    if not parts:
        return None
    if all(isinstance(p, dict) and isinstance(p.get("content"), list) for p in parts):
        return {"content": [item for p in parts for item in p["content"]]}
    return parts[-1] if len(parts) == 1 else parts
