"""Reassemble streamed OpenAI chunks into the object a non-streaming call would have returned.

``chat.completion.chunk`` → ``chat.completion`` and streamed ``text_completion`` → ``text_completion``,
including tool-call fragments (concatenated by index), finish reasons, logprobs and the usage chunk.
"""

from __future__ import annotations

from typing import Any

from hookline.jobs import Operation
from hookline.upstreams.base import DeltaSink


class StreamAssembler:
    def __init__(self, operation: Operation, on_delta: DeltaSink) -> None:
        self.operation = operation
        self.on_delta = on_delta
        self.header: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.finished = False
        self._unsent: dict[int, list[str]] = {}  # new text per choice, not yet given to on_delta

    def feed(self, *chunks: dict[str, Any]) -> None:
        """Take chunks that arrived together: their text goes to ``on_delta`` once per choice
        (a burst of a fast upstream is one live delta, not hundreds)."""
        for chunk in chunks:
            self._take(chunk)
        if self._unsent:
            unsent, self._unsent = self._unsent, {}
            for index, parts in unsent.items():
                self.on_delta(index, "".join(parts))

    def _take(self, chunk: dict[str, Any]) -> None:
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if chunk.get(key) is not None:
                self.header[key] = chunk[key]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index", 0))
            state = self.choices.setdefault(index, {"index": index, "text": [], "tools": {}})
            if self.operation is Operation.CHAT_COMPLETIONS:
                self._feed_chat(state, choice)
            else:
                text = choice.get("text") or ""
                if text:
                    state["text"].append(text)
                    self._unsent.setdefault(index, []).append(text)
            if choice.get("logprobs") is not None:
                state.setdefault("logprobs", []).append(choice["logprobs"])
            if choice.get("finish_reason"):
                state["finish_reason"] = choice["finish_reason"]
                self.finished = True

    def _feed_chat(self, state: dict[str, Any], choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if delta.get("role"):
            state["role"] = delta["role"]
        content = delta.get("content")
        if content:
            state["text"].append(content)
            self._unsent.setdefault(state["index"], []).append(content)
        if delta.get("refusal"):
            state["refusal"] = state.get("refusal", "") + delta["refusal"]
        for call in delta.get("tool_calls") or []:
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
        message: dict[str, Any] = {"role": state.get("role", "assistant"), "content": text or None}
        if state.get("refusal"):
            message["refusal"] = state["refusal"]
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
