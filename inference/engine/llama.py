"""Loaded llama.cpp models and single-sequence generation.

A worker keeps each model loaded between requests (`get_model` caches by path and load options). One
`LoadedModel` generates one sequence at a time under its lock; continuous batching across sequences is
issue #3's scheduler."""

import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .text import TextDecoder

logger = logging.getLogger(__name__)


class PromptError(Exception):
    """The prompt cannot be built (no chat template, the template refused the messages)."""


class ContextOverflow(Exception):
    """The prompt does not fit in the context window."""

    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(
            f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages."
        )
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


@dataclass
class SamplingParams:
    """Defaults follow llama-server, so a small model gives sensible text when a client sends none."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class Generation:
    """Iterating yields text deltas; afterwards `finish_reason` and `completion_tokens` are set."""

    def __init__(self, model: "LoadedModel", prompt: list[int], params: SamplingParams, max_tokens: int,
                 cancelled: Callable[[], bool]):  # fmt: skip
        self.model, self.prompt, self.params, self.max_tokens = model, prompt, params, max_tokens
        self.cancelled = cancelled
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def __iter__(self) -> Iterator[str]:
        llama = self.model.llama
        decoder = TextDecoder(self.params.stop)
        with self.model.lock:
            llama.set_seed(self.params.seed if self.params.seed is not None else random.getrandbits(32))
            history = list(self.prompt)
            tokens = llama.generate(
                self.prompt,
                temp=self.params.temperature,
                top_p=self.params.top_p,
                top_k=self.params.top_k,
                min_p=self.params.min_p,
                presence_penalty=self.params.presence_penalty,
                frequency_penalty=self.params.frequency_penalty,
            )
            try:
                for token in tokens:
                    if llama_cpp.llama_vocab_is_eog(llama._model.vocab, token):
                        self.finish_reason = "stop"
                        break
                    self.completion_tokens += 1
                    text = decoder.feed(llama.detokenize([token], prev_tokens=history))
                    history.append(token)
                    if text:
                        yield text
                    if decoder.stop.stopped:
                        self.finish_reason = "stop"
                        break
                    if self.completion_tokens >= self.max_tokens:
                        self.finish_reason = "length"
                        break
                    if self.cancelled():
                        self.finish_reason = "cancelled"
                        break
            finally:
                tokens.close()
        tail = decoder.flush()
        if tail:
            yield tail


class LoadedModel:
    def __init__(self, path: str, *, n_ctx: int, n_gpu_layers: int = 0, n_threads: int | None = None):
        self.path = path
        self.llama = llama_cpp.Llama(
            model_path=path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            verbose=False,
        )
        self.n_ctx = self.llama.n_ctx()
        self.lock = threading.Lock()
        template = self.llama.metadata.get("tokenizer.chat_template")
        self.chat_formatter = None
        if template:
            vocab = self.llama._model
            self.chat_formatter = Jinja2ChatFormatter(
                template=template,
                bos_token=vocab.token_get_text(self.llama.token_bos()) if self.llama.token_bos() >= 0 else "",
                eos_token=vocab.token_get_text(self.llama.token_eos()) if self.llama.token_eos() >= 0 else "",
            )

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Render messages with the model's own chat template and tokenize the result."""
        if self.chat_formatter is None:
            raise PromptError(
                "This model has no chat template, so it cannot serve /v1/chat/completions; "
                "use /v1/completions with a plain prompt."
            )
        try:
            rendered = self.chat_formatter(messages=messages)
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise PromptError(f"The model's chat template rejected the messages: {exc}") from None
        return self.llama.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)

    def text_prompt(self, text: str) -> list[int]:
        """Tokenize a raw completion prompt (with BOS, special tokens parsed as text)."""
        return self.llama.tokenize(text.encode(), add_bos=True, special=False)

    def generate(self, prompt: list[int], params: SamplingParams,
                 cancelled: Callable[[], bool] = lambda: False) -> Generation:  # fmt: skip
        """Check the prompt fits, clamp max_tokens to the room left, and return the generation to iterate."""
        if not prompt:
            raise PromptError("The prompt is empty.")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        vocab_size = self.llama.n_vocab()
        if any(not 0 <= t < vocab_size for t in prompt):
            raise PromptError(f"The prompt contains token ids outside the vocabulary (0..{vocab_size - 1}).")
        room = self.n_ctx - len(prompt)
        max_tokens = min(params.max_tokens or room, room)
        return Generation(self, prompt, params, max_tokens, cancelled)


_models: dict[tuple, LoadedModel] = {}
_models_lock = threading.Lock()


def get_model(path: str, *, n_ctx: int, n_gpu_layers: int = 0, n_threads: int | None = None) -> LoadedModel:
    """The loaded model for these options, loading it on first use and keeping it for later requests."""
    key = (str(Path(path).resolve()), n_ctx, n_gpu_layers, n_threads)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            logger.info("loading %s (n_ctx=%s, n_gpu_layers=%s)", path, n_ctx, n_gpu_layers)
            model = _models[key] = LoadedModel(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=n_threads)
        return model
