"""A loaded llama.cpp model and its scheduler: continuous batching over llama-cpp-python's low-level API.

One `LoadedModel` owns the weights, one llama_context with a KV cache split into `n_parallel` sequence slots,
and a scheduler thread. Callers `submit()` a tokenized prompt and wait; every scheduler step puts the next
token of each generating sequence and a chunk of each prefilling prompt into one `llama_decode`, samples each
sequence with its own sampler chain, and hands the step's events to `StepIO` in one call (so the service can
publish them and check cancellations in one Redis round trip)."""

import array
import collections
import ctypes
import dataclasses
import logging
import math
import queue
import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import llama_cpp
import numpy as np
from llama_cpp import _internals, _logger

from .batch import Batch
from .draft import DraftModel
from .host import cpu_has_amx, usable_cpus
from .prompts import PROMPT_CACHE_MIN_TOKENS, PromptCache, common_prefix
from .template import ChatTemplate, ChatTemplateError
from .text import TextDecoder

logger = logging.getLogger(__name__)
_logger.set_verbose(False)  # llama.cpp logs every tensor of every graph otherwise


PARALLEL_SAMPLING_MIN = 4  # sequences in a step before sampling goes to the thread pool
# With at most this many sequences running, a step that produced a first token waits (briefly) until the IO thread
# has published it before the next decode: on a CPU the decode's threads take every core, and a first token
# published meanwhile waited for one (2-5 ms of TTFT on 2 cores). Busier, the wait would cost every sequence a step.
FIRST_TOKEN_WAIT_MAX = 4
# Prompt tokens another running sequence must share with a new one before its KV cells are copied rather than
# decoded again: in a split cache a copy moves a whole slot's buffer, in a shared one it only tags cells.
PREFIX_COPY_MIN, PREFIX_COPY_MIN_SHARED = 256, 16
# KV cache types (llama.cpp's names): f16 is exact; q8_0 halves the cache, q4_0 quarters it (both need flash
# attention, which llama.cpp turns on where the backend has it).
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}


class PromptError(Exception):
    """The prompt cannot be built (no chat template, the template refused the messages, bad token ids)."""


class GrammarUncompilable(PromptError):
    """llama.cpp refused the grammar made of the request's tools or response format."""


class ContextOverflow(Exception):
    """The prompt does not fit in a sequence's context window."""

    def __init__(self, prompt_tokens: int, n_ctx: int, *, message: str | None = None):
        super().__init__(
            message
            or f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted in "
            f"{prompt_tokens} tokens. Please reduce the length of the messages."
        )
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


class EngineError(Exception):
    """llama.cpp failed to decode a batch."""


class ContextFull(Exception):
    """The slots' shared KV cells are all in use: the newest sequence gives way (the client may retry)."""


class GrammarDeadEnd(Exception):
    """The request's grammar allows no token the model can write next (say, a pattern that requires a NUL
    character, which llama.cpp never samples): the request's fault, and it ends with an error."""


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


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
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely alternatives
    grammar: str | None = None  # GBNF (root rule `root`): only tokens the grammar allows are sampled
    # Lazy grammar: regexes (ECMAScript) over the output; the grammar holds only from the first match on, so the
    # text before it is free (a tool call that may or may not come).
    grammar_triggers: list[str] = field(default_factory=list)
    # Special tokens whose text goes into the answer (llama-server's "preserved tokens": a tool-call format's
    # markers, such as gpt-oss's <|channel|>); any other special token is no text. End-of-generation tokens end the
    # answer before they could be text, whatever this says.
    preserved_tokens: frozenset[int] = frozenset()


class StepIO(Protocol):
    def step(self, events: list[tuple["Sequence", str, dict]], active: list["Sequence"]) -> set["Sequence"]:
        """Deliver this step's events; return the active sequences whose clients have gone."""


class Sequence:
    """One request inside the scheduler. Its owner waits on `finished`; results are on the object."""

    def __init__(self, key: str, prompt: list[int], params: SamplingParams, max_tokens: int, index: int = 0):
        self.key, self.prompt, self.params, self.max_tokens = key, prompt, params, max_tokens
        self.index = index  # the choice index, when one request asks for n > 1 completions
        self.leader: Sequence | None = None  # for n > 1: the sequence whose prompt KV cells this one copies
        self.waiting_for_leader = False
        # Another request's sequence whose prompt starts like this one's: its first `prefix_len` KV cells are
        # copied once it has decoded them, instead of decoding them again here (see _copy_prefixes).
        self.prefix_from: Sequence | None = None
        self.prefix_len = 0
        self.drafts: list[int] = []  # speculative tokens in this step's batch after next_token, to verify
        self.slot: Slot | None = None
        self.pending: list[int] = []  # prompt tokens not yet decoded
        self.n_past = 0  # tokens of this sequence in the KV cache
        self.batch_index = -1  # where its logits are in the current batch, or -1
        self.next_token = -1  # sampled, not yet decoded
        self.sampler: _internals.LlamaSampler | None = None
        self.on_backend = False  # its sampler chain is attached to the context (backend sampling)
        self.decoder = TextDecoder(params.stop)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.drafted = self.accepted = 0  # speculative tokens proposed for this sequence, and those it kept
        self.draft_window = 0  # the most tokens to draft next: halved when none held, doubled when all did (0: max)
        self.draft_misses = 0  # drafts of one token that failed in a row; each doubles the steps drafting rests
        self.draft_rest = 0  # steps to go without drafting
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.logprobs: list[dict] = []  # entries not yet sent with a text event
        self.info: dict = {}  # extra data for the `start` event
        self.finished = threading.Event()
        # Greedy or seeded: the same request must give the same text, so its prompt's last token is decoded alone.
        self.repeatable = params.temperature <= 0 or params.seed is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)


@dataclass
class Slot:
    id: int
    tokens: list[int] = field(default_factory=list)  # exactly what the KV cache holds for this sequence id
    sequence: Sequence | None = None
    last_used: float = 0.0
    saved_len: int = 0  # tokens[:saved_len] is in the host prompt cache (saved while the slot was idle, or leaving)


class NullIO:
    def step(self, events, active):
        return set()


def _warm_up(model: _internals.LlamaModel, ctx, memory) -> None:
    """Decode BOS and EOS once and forget them, as llama-server does before it says it is ready: the first request
    then finds the weights paged in, the GPU's kernels loaded and its buffers allocated (every expert of a MoE is
    touched, in llama.cpp's warm-up mode), and pays none of it."""
    tokens = [t for t in (model.token_bos(), model.token_eos()) if t >= 0] or [0]
    array = (llama_cpp.llama_token * len(tokens))(*tokens)
    llama_cpp.llama_set_warmup(ctx, True)
    try:
        if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) != 0:
            logger.warning("the warm-up decode failed; the first request will pay for what it touches first")
        llama_cpp.llama_synchronize(ctx)
    finally:
        llama_cpp.llama_memory_clear(memory, True)
        llama_cpp.llama_set_warmup(ctx, False)


class LoadedModel:
    def __init__(self, path: str, *, n_ctx: int, n_parallel: int = 1, n_gpu_layers: int = 0,
                 n_threads: int | None = None, n_batch: int = 512, io: StepIO | None = None,
                 chat_template: str | None = None, shared_cells: bool = True,
                 cache_type: str = "f16", draft_max: int = 0, draft_path: str | None = None,
                 cache_ram_bytes: int = 0, backend_sampling: bool = False,
                 on_progress: Callable[[float], None] | None = None):  # fmt: skip
        """`n_ctx`: the most tokens one sequence may hold. With `shared_cells` the slots share one KV cache of
        n_ctx cells (llama.cpp's unified cache): four slots of a 32k model do not reserve 128k cells, and when
        the cells run out idle slots' cached prefixes go first, then the newest sequence (ContextFull).
        Without, each slot has n_ctx cells of its own. `draft_max`: speculative decoding, up to that many drafted
        tokens per sequence and step (0: off), by prompt lookup, or by the model at `draft_path` (a DraftModel with
        this model's vocabulary). `cache_ram_bytes`: prompts that leave the slots
        are kept in host memory up to this many bytes (prompts.PromptCache; 0: off). `backend_sampling`: a
        sequence's sampler chain runs inside the decode's graph, on the GPU (llama.cpp's experimental
        `llama_set_sampler`), unless it needs what only the CPU chain does (a grammar, logprobs, drafts).
        `on_progress` hears how far the weights' load is (0 to 1), from llama.cpp's progress callback."""
        self.draft_max = draft_max
        self.backend_sampling = backend_sampling and not draft_max  # verifying drafts reads several rows' logits
        self.prompt_cache = PromptCache(cache_ram_bytes) if cache_ram_bytes > 0 else None
        self.path = path
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 999 if n_gpu_layers < 0 else n_gpu_layers  # -1: every layer
        # llama.cpp (0.3.36's) AMX kernels, which it picks for weights on CPUs with AMX (Sapphire Rapids and later),
        # crash in mul_mat on any batch of more than a few tokens (seen with Q4_1). Without "extra buffer types" the
        # weights stay in the plain CPU buffer; elsewhere the extra types only repack weights for speed.
        # With speculative decoding they stay off too: repacked weights take other kernels for a row computed in a
        # batch of several than for one alone, and verified drafts must round as the tokens decoded one by one do.
        mparams.use_extra_bufts = not cpu_has_amx() and not draft_max
        if on_progress is not None:

            def progress(value: float, _user_data) -> bool:
                try:
                    on_progress(value)
                except Exception:  # a listener's failure must not abort the load (False would)
                    logger.exception("load progress listener failed")
                return True

            callback = llama_cpp.llama_progress_callback(progress)  # referenced until the load returns
            mparams.progress_callback = callback
        self.model = _internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.n_parallel = n_parallel
        self.n_batch = n_batch = max(n_batch, n_parallel)  # every generating sequence needs its token in a step
        cparams = llama_cpp.llama_context_default_params()
        self.shared_cells = shared_cells and n_parallel > 1
        cparams.n_ctx = n_ctx if self.shared_cells else n_ctx * n_parallel
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = n_parallel
        cparams.kv_unified = self.shared_cells
        cparams.type_k = cparams.type_v = KV_CACHE_TYPES[cache_type]
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        cparams.no_perf = True
        # llama.cpp's default is 4 threads; on a 2-core machine that oversubscribes and triples the time per token.
        cparams.n_threads = cparams.n_threads_batch = n_threads or usable_cpus()
        self.context = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.ctx = self.context.ctx
        self.drafter = None
        if draft_max and draft_path:
            try:
                self.drafter = DraftModel(draft_path, self.model, n_ctx=n_ctx, n_parallel=n_parallel,
                                          n_gpu_layers=n_gpu_layers, n_threads=cparams.n_threads, n_batch=n_batch,
                                          shared_cells=self.shared_cells, draft_max=draft_max)  # fmt: skip
            except Exception:
                self.context.close()
                self.model.close()
                raise
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        _warm_up(self.model, self.ctx, self.memory)
        if self.drafter is not None:
            _warm_up(self.drafter.model, self.drafter.ctx, self.drafter.memory)
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.n_cells = llama_cpp.llama_n_ctx(self.ctx)  # KV cells in all
        self.eog_tokens = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._eog = set(self.eog_tokens)
        control = [self.model.token_get_text(t) for t in range(self.n_vocab)
                   if llama_cpp.llama_vocab_get_attr(self.vocab, t) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL]  # fmt: skip
        pattern = "|".join(re.escape(text) for text in sorted(filter(None, control), key=len, reverse=True))
        self._control_text = re.compile(pattern or "(?!)")  # what user content must not be able to spell
        self._pieces: dict[int, bytes] = {}
        self.metadata = self.model.metadata()
        self.chat_template = self._chat_template(chat_template or self.metadata.get("tokenizer.chat_template"))
        self.size_bytes = self.model.size()

        self.io: StepIO = io or NullIO()
        self.slots = [Slot(i) for i in range(n_parallel)]
        self._batch = Batch(n_batch)
        self._waiting: collections.deque[list[Sequence]] = collections.deque()  # requests: n sequences each
        self._active: list[Sequence] = []
        self._wakeup = threading.Condition()
        self._closed = False
        self.last_used = time.monotonic()
        # Where the scheduler's time goes (see BENCHMARKS.md): decode = llama_decode, sample = sampling and text,
        # step - decode - sample = Python bookkeeping; io = the IO thread's Redis calls.
        self.stats = {"steps": 0, "batch_tokens": 0, "step_s": 0.0, "decode_s": 0.0, "sample_s": 0.0, "io_s": 0.0}
        threads = min(n_parallel, usable_cpus())
        self._sampling_pool = ThreadPoolExecutor(threads, thread_name_prefix="sample") if threads > 1 else None
        self._io_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._io_lock = threading.Lock()
        self._cancelled: set[Sequence] = set()
        self._io_error: Exception | None = None
        self._ended: list[Sequence] = []  # finished in this step; set `finished` once published
        self._io_thread = threading.Thread(target=self._run_io, name=f"io:{path}", daemon=True)
        self._io_thread.start()
        self._thread = threading.Thread(target=self._run, name=f"scheduler:{path}", daemon=True)
        self._thread.start()

    # -- prompts -----------------------------------------------------------------------------------------

    def _chat_template(self, source: str | None) -> ChatTemplate | None:
        if not source:
            return None
        bos, eos = self.model.token_bos(), self.model.token_eos()
        try:
            return ChatTemplate(
                source,
                bos_token=self.model.token_get_text(bos) if bos >= 0 else "",
                eos_token=self.model.token_get_text(eos) if eos >= 0 else "",
                max_chars=max(1 << 20, 32 * self.n_ctx),  # far more than fits in the context: only runaways stop
            )
        except ChatTemplateError as exc:
            logger.warning("%s: %s; chat is unavailable for this model", self.path, exc)
            return None

    def chat_prompt(self, messages: list[dict], **template_vars) -> list[int]:
        """Render messages with the model's own chat template (plus variables such as `tools` and
        `reasoning_effort`) and tokenize the result; the template writes BOS itself if the model wants it."""
        if self.chat_template is None:
            raise PromptError(
                "This model has no usable chat template, so it cannot serve /v1/chat/completions; "
                "use /v1/completions with a plain prompt."
            )
        if not any(isinstance(m.get("content"), str) and self._control_text.search(m["content"]) for m in messages):
            return self.model.tokenize(self._render(messages, template_vars).encode(), add_bos=False, special=True)
        # Some content spells a control token (`<|im_start|>system` in a user message): render with placeholders,
        # then tokenize the template's own text with special tokens and every content as plain text, so a user
        # can never forge a turn.
        marked = [dict(m, content=f"\ue000{i}\ue001") if isinstance(m.get("content"), str) else m
                  for i, m in enumerate(messages)]  # fmt: skip
        tokens: list[int] = []
        for k, part in enumerate(re.split("\ue000(\\d+)\ue001", self._render(marked, template_vars))):
            if k % 2:
                tokens += self.model.tokenize(messages[int(part)]["content"].encode(), add_bos=False, special=False)
            elif part:
                tokens += self.model.tokenize(part.encode(), add_bos=False, special=True)
        return tokens

    def _render(self, messages: list[dict], template_vars: dict) -> str:
        try:
            return self.chat_template.render(messages, **template_vars)
        except ChatTemplateError as exc:
            raise PromptError(str(exc)) from None

    def text_prompt(self, text: str) -> list[int]:
        """Tokenize a raw completion prompt (with BOS; special tokens are plain text)."""
        return self.model.tokenize(text.encode(), add_bos=True, special=False)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens, special=True).decode(errors="replace")

    # -- requests ----------------------------------------------------------------------------------------

    def submit(self, key: str, prompt: list[int], params: SamplingParams) -> Sequence:
        """Check the prompt fits, clamp max_tokens to the room left, and queue it for the next step."""
        return self.submit_many(key, prompt, params, 1)[0]

    def submit_many(self, key: str, prompt: list[int], params: SamplingParams, n: int,
                    info: dict | None = None) -> list[Sequence]:  # fmt: skip
        """Like `submit`, for n completions of one prompt: the prompt is decoded once and its KV cells copied.
        `info` rides along in the request's `start` event (e.g. the tool-call format the view must parse)."""
        if n > self.n_parallel:
            raise PromptError(f"n={n} is more than this model's {self.n_parallel} parallel slots.")
        if not prompt:
            raise PromptError("The prompt is empty.")
        if any(not 0 <= t < self.n_vocab for t in prompt):
            raise PromptError(f"The prompt contains token ids outside the vocabulary (0..{self.n_vocab - 1}).")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(len(prompt), self.n_ctx)
        room = self.n_ctx - len(prompt)
        max_tokens = min(params.max_tokens or room, room)
        # With a seed, choice i samples with seed + i: reproducible, yet the choices differ from each other.
        seeds = [None if params.seed is None else params.seed + i for i in range(n)]
        group = [Sequence(key, list(prompt), dataclasses.replace(params, seed=seeds[i]), max_tokens, index=i)
                 for i in range(n)]  # fmt: skip
        for sequence in group:  # here, in the caller's thread: a bad grammar is the caller's error
            sequence.sampler = self._sampler(sequence.params)
        for follower in group[1:]:
            follower.leader, follower.waiting_for_leader = group[0], True
        group[0].info = info or {}
        with self._wakeup:
            if self._closed:
                raise EngineError("The model is being unloaded.")
            self._waiting.append(group)
            self.last_used = time.monotonic()
            self._wakeup.notify()
        return group

    def busy_slots(self) -> int:
        return sum(1 for s in self.slots if s.sequence is not None) + sum(len(g) for g in self._waiting)

    def close(self) -> None:
        """Stop the scheduler (failing anything still queued or running) and free the model."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=30)
        self._io_queue.put(None)
        self._io_thread.join(timeout=30)
        if self._sampling_pool is not None:
            self._sampling_pool.shutdown()
        if self.drafter is not None:
            self.drafter.close()
        self.context.close()
        self.model.close()

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle_slot = None
            with self._wakeup:
                while not self._closed and not self._waiting and not self._active:
                    idle_slot = self._unsaved_idle_slot()
                    if idle_slot is not None:
                        break
                    self._wakeup.wait()
                if self._closed:
                    break
                if idle_slot is None:
                    self._admit()
            if idle_slot is not None:
                # Nothing to decode: copy an idle slot's cells to the host cache now, one slot at a time (a request
                # arriving waits for one copy at most), so that admitting the next request need not.
                self._save(idle_slot)
                continue
            try:
                self._step()
            except Exception as exc:  # a failed decode fails the sequences in it; the thread lives on
                logger.exception("scheduler step failed for %s", self.path)
                for sequence in list(self._active):
                    sequence.error = exc
                    self._finish(sequence, None)
                self._io_queue.put(([], [], self._ended, None))
                self._ended = []
        for sequence in [*(s for group in self._waiting for s in group), *self._active]:
            sequence.error = EngineError("The model was unloaded.")
            self._finish(sequence, None)

    def _admit(self) -> None:
        """Give each waiting request free slots: the first sequence gets the slot whose cached tokens share the
        longest prefix with its prompt; the others of an n > 1 request get any free slot. Then, in a shared cache,
        idle slots' cells move to host memory (_offload_idle)."""
        admitted = False
        while self._waiting:
            free = [s for s in self.slots if s.sequence is None]
            if len(free) < len(self._waiting[0]):
                break
            admitted = True
            sequence, *followers = self._waiting.popleft()
            slot = max(free, key=lambda s: (common_prefix(s.tokens, sequence.prompt), -s.last_used))
            reuse = self._through_host(slot, sequence.prompt, common_prefix(slot.tokens, sequence.prompt))
            if reuse == len(sequence.prompt):
                reuse -= 1  # the last prompt token must be decoded again to get its logits
            if not llama_cpp.llama_memory_seq_rm(self.memory, slot.id, reuse, -1):
                llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
                reuse = 0
            slot.tokens = slot.tokens[:reuse]
            slot.saved_len = min(slot.saved_len, reuse)
            slot.sequence, sequence.slot = slot, slot
            if not followers:  # n > 1: the followers' first tokens come from the leader's row, on the CPU
                self._attach_sampler(sequence)
            sequence.n_past = sequence.cached_tokens = reuse
            sequence.pending = sequence.prompt[reuse:]
            source, length = self._prefix_source(sequence.prompt)
            if length - reuse >= (PREFIX_COPY_MIN_SHARED if self.shared_cells else PREFIX_COPY_MIN):
                sequence.prefix_from, sequence.prefix_len = source, length
            self._active.append(sequence)
            for follower in followers:
                free.remove(slot)
                slot = min(free, key=lambda s: s.last_used)
                slot.sequence, follower.slot = slot, slot
                self._active.append(follower)
        if admitted and self.shared_cells and self.prompt_cache is not None:
            self._offload_idle()

    def _attach_sampler(self, sequence: Sequence) -> None:
        """With backend sampling, hand the sequence's chain to llama.cpp for its slot (it samples inside the graph;
        llama.cpp reserves its graphs again). A grammar, logprobs (raw logits), n > 1 (the other choices sample the
        leader's row) or a chain llama.cpp cannot run stay here."""
        params = sequence.params
        if self.backend_sampling and not params.grammar and params.logprobs is None:
            sequence.on_backend = llama_cpp.llama_set_sampler(self.ctx, sequence.slot.id, sequence.sampler.sampler)
            self.stats["backend_samplers"] = self.stats.get("backend_samplers", 0) + sequence.on_backend

    def _unsaved_idle_slot(self) -> Slot | None:
        if self.prompt_cache is None:
            return None
        return next((slot for slot in self.slots if slot.sequence is None and slot.saved_len != len(slot.tokens)
                     and len(slot.tokens) >= PROMPT_CACHE_MIN_TOKENS), None)  # fmt: skip

    def _offload_idle(self) -> None:
        """Save idle slots' cells to the host prompt cache and free them (llama-server's --cache-idle-slots): in a
        shared cache attention spans every used cell, masked or not, so cells nobody reads slow every step."""
        for slot in self.slots:
            if slot.sequence is None and slot.tokens:
                if len(slot.tokens) >= PROMPT_CACHE_MIN_TOKENS and self._may_save():
                    self._save(slot)
                llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
                slot.tokens = []

    def _through_host(self, slot: Slot, prompt: list[int], reuse: int) -> int:
        """With the host prompt cache: save what the slot holds before its cells past `reuse` go, and load the
        saved sequence that shares the most of `prompt` into the slot if it shares clearly more than the slot
        does. How many tokens of `prompt` the slot holds then."""
        if self.prompt_cache is None:
            return reuse
        saved, length = self.prompt_cache.best(prompt)
        better = length >= reuse + PROMPT_CACHE_MIN_TOKENS
        if len(slot.tokens) - (0 if better else reuse) >= PROMPT_CACHE_MIN_TOKENS and self._may_save():
            self._save(slot)
        state = self.prompt_cache.take(saved) if better else None  # None too if saving pushed it out
        if state is None:
            return reuse
        llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
        buffer = state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if llama_cpp.llama_state_seq_set_data(self.ctx, buffer, len(state), slot.id) != len(state):
            # No room for it in one piece (shared cells, fragmented): the prompt is computed instead, and the saved
            # copy stays for a later, emptier moment.
            llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
            slot.tokens = []
            self.prompt_cache.put(list(saved), state)
            return 0
        slot.tokens, slot.saved_len = list(saved), 0  # taken out of the host cache
        self.stats["prompt_cache_loads"] = self.stats.get("prompt_cache_loads", 0) + 1
        return length

    def _may_save(self) -> bool:
        """Whether to save a leaving slot now. A save stalls every running sequence (a long prompt's cells take tens
        of ms to copy off a GPU): free with nothing running, otherwise made only while saves pay (worth_saving)."""
        return not self._active or self.prompt_cache.worth_saving()

    def _save(self, slot: Slot) -> None:
        """Copy a slot's KV cells into the host prompt cache (unless they are there already)."""
        if slot.saved_len == len(slot.tokens):
            return
        slot.saved_len = len(slot.tokens)  # saved, or tried: cells too large for the cache are not tried again
        size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.id)
        if not size or size > self.prompt_cache.limit_bytes:
            return
        # Not a bytearray: it zero-fills its memory first, which took longer than the copy (90 MB: ~60 vs ~20 ms).
        state = np.empty(size, np.uint8)
        written = llama_cpp.llama_state_seq_get_data(
            self.ctx, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), size, slot.id
        )
        if written:
            self.prompt_cache.put(slot.tokens, state[:written])
            self.stats["prompt_cache_saves"] = self.stats.get("prompt_cache_saves", 0) + 1

    def _prefix_source(self, prompt: list[int]) -> tuple[Sequence | None, int]:
        """The running sequence (prefilling or generating) whose prompt shares the longest beginning with `prompt`,
        and how many of its tokens this one may copy (not the last: its logits must be computed here)."""
        best, length = None, 0
        for other in self._active:
            if not other.waiting_for_leader:
                shared = min(common_prefix(other.prompt, prompt), len(prompt) - 1)
                if shared > length:
                    best, length = other, shared
        return best, length

    def _copy_prefixes(self) -> None:
        """Sequences that wait for another's prompt: once its KV cells hold the shared beginning, copy them (llama.cpp
        copies cells between sequences: metadata only in a shared cache, the whole stream's buffer in a split
        one, once, before the next decode) and go on with the rest of the prompt. If the source ended without
        them, the sequence decodes its prompt itself."""
        for sequence in self._active:
            source = sequence.prefix_from
            if source is None:
                continue
            slot = source.slot
            ready = (
                slot is not None
                and len(slot.tokens) >= sequence.prefix_len
                and source.n_past >= sequence.prefix_len
                and slot.tokens[: sequence.prefix_len] == sequence.prompt[: sequence.prefix_len]
            )
            if not ready and source.finish_reason is None and source in self._active:
                continue  # not there yet
            sequence.prefix_from = None
            if not ready:
                continue  # it ended first: decode them here
            target, length = sequence.slot, sequence.prefix_len
            llama_cpp.llama_memory_seq_rm(self.memory, target.id, -1, -1)
            if self.shared_cells:
                llama_cpp.llama_memory_seq_cp(self.memory, slot.id, target.id, 0, length)
            else:  # between streams llama.cpp copies only whole buffers: copy, then drop what is past the prefix
                llama_cpp.llama_memory_seq_cp(self.memory, slot.id, target.id, -1, -1)
                llama_cpp.llama_memory_seq_rm(self.memory, target.id, length, -1)
            target.tokens, target.saved_len = sequence.prompt[:length], 0
            sequence.n_past = sequence.cached_tokens = length
            sequence.pending = sequence.prompt[length:]
            self.stats["prefix_copies"] = self.stats.get("prefix_copies", 0) + 1

    def _copy_prompt_to_followers(self) -> None:
        """Once a leader's prompt is decoded, its followers take copies of its KV cells and sample from its
        logits in the same step."""
        for follower in self._active:
            leader = follower.leader
            if follower.waiting_for_leader and leader.batch_index >= 0 and not leader.pending:
                llama_cpp.llama_memory_seq_rm(self.memory, follower.slot.id, -1, -1)
                llama_cpp.llama_memory_seq_cp(self.memory, leader.slot.id, follower.slot.id, -1, -1)
                follower.slot.tokens, follower.slot.saved_len = list(leader.slot.tokens), 0
                follower.n_past, follower.cached_tokens = leader.n_past, leader.cached_tokens
                follower.batch_index = leader.batch_index
                follower.waiting_for_leader = False

    def _make_room(self) -> int:
        """With shared cells: free enough of them for this step's tokens, and return how many prompt tokens the
        step may add. Idle slots' cached prefixes go first (least recently used first); if the generating
        sequences still do not each have a cell, the newest sequence ends with ContextFull."""
        if not self.shared_cells:
            return self.n_batch
        generating = sum(1 for s in self._active if not s.pending and not s.waiting_for_leader)
        prompt = sum(len(s.pending) for s in self._active)
        want = generating + min(prompt, self.n_batch)
        free = self.n_cells - sum(len(slot.tokens) for slot in self.slots)
        idle = sorted((slot for slot in self.slots if slot.sequence is None and slot.tokens), key=lambda s: s.last_used)
        for slot in idle:
            if free >= want:
                break
            if self.prompt_cache is not None and len(slot.tokens) >= PROMPT_CACHE_MIN_TOKENS and self._may_save():
                self._save(slot)
            llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
            free, slot.tokens = free + len(slot.tokens), []
        # A prompt waits for cells while sequences generate (they end, or fill up and meet the line below); with
        # nothing generating it could wait forever.
        while self._active and (free < generating or (free <= 0 < prompt and not generating)):
            victim = max(self._active, key=lambda s: s.submitted)
            victim.error = ContextFull(
                f"The model's context is shared by its {self.n_parallel} slots ({self.n_cells} tokens) and is full "
                "with other requests; try again shortly."
            )
            free += len(victim.slot.tokens) if victim.slot else 0
            generating -= 0 if victim.pending or victim.waiting_for_leader else 1
            prompt -= len(victim.pending)
            self._finish(victim, None, [])
        return max(free - generating, 0)

    def _step(self) -> None:
        started = time.perf_counter()
        batch = self._batch
        batch.clear()
        self._copy_prefixes()
        room = self._make_room()  # prompt tokens this step may add
        if self.draft_max:  # speculative: the drafts are verified in this same step
            drafting = time.perf_counter()
            room -= self._draft_all(room)
            self.stats["draft_s"] = self.stats.get("draft_s", 0) + time.perf_counter() - drafting
        # Generating sequences first (one token each, and its drafts), then prompt chunks in arrival order; in the
        # batch, by slot (below).
        rows = []  # (sequence, tokens, position of the first, outputs: logits for its last `outputs` tokens)
        generating = []
        for sequence in self._active:
            sequence.batch_index = -1
            if sequence.waiting_for_leader or sequence.prefix_from is not None:
                continue
            if not sequence.pending:
                tokens = [sequence.next_token, *sequence.drafts]
                rows.append((sequence, tokens, sequence.n_past, len(tokens)))
                generating.append(sequence)
                sequence.slot.tokens.extend(tokens)
                sequence.n_past += len(tokens)
        room_in_batch = self.n_batch - sum(len(tokens) for _s, tokens, _p, _o in rows)
        for sequence in self._active:
            if sequence.pending and room_in_batch and room and sequence.prefix_from is None:
                # For a request meant to repeat (greedy or seeded), the prompt's last token goes in a step of its
                # own, as it does when the rest of the prompt comes from the prefix cache: its logits (computed in a
                # smaller batch) then do not depend on the cache, and the same request gives the same text, cached
                # or not. Sampling without a seed has nothing to repeat: it does not wait that step.
                hold = sequence.repeatable and len(sequence.pending) > 1
                chunk = sequence.pending[: len(sequence.pending) - hold][: min(room_in_batch, room)]
                room -= len(chunk)
                room_in_batch -= len(chunk)
                sequence.pending = sequence.pending[len(chunk) :]
                rows.append((sequence, chunk, sequence.n_past, 0 if sequence.pending else 1))
                sequence.n_past += len(chunk)
                sequence.slot.tokens.extend(chunk)
        padding = self._padding(generating, room_in_batch)
        # With a KV cache per slot, llama.cpp splits a batch into passes over the weights, each holding a run of
        # consecutive slots with as many tokens each: slots in order, and drafting slots padded to one length.
        for sequence, tokens, position, outputs in sorted(rows, key=lambda row: row[0].slot.id):
            last = batch.add(tokens, position, sequence.slot.id, logits=outputs, padding=padding.get(sequence, 0))
            if outputs:
                sequence.batch_index = last - outputs + 1
        decode_started = time.perf_counter()
        if batch.n:
            code = llama_cpp.llama_decode(self.ctx, batch.struct)
            if code != 0:
                raise EngineError(f"llama_decode returned {code}")
            for sequence in padding:  # the padding's cells
                llama_cpp.llama_memory_seq_rm(self.memory, sequence.slot.id, sequence.n_past, -1)
        decoded = time.perf_counter()
        self._copy_prompt_to_followers()

        events: list[tuple[Sequence, str, dict]] = []
        sampling = [s for s in self._active if s.batch_index >= 0]
        for sequence, tokens in zip(sampling, self._sample(sampling), strict=True):
            token = tokens[0]
            if sequence.first_token_at is None and sequence.leader is None:
                # `thinking`: the template opened a <think> block itself, so the output starts inside it.
                thinking = self.detokenize(sequence.prompt[-4:]).rstrip().endswith("<think>")
                events.append((sequence, "start", {"prompt_tokens": len(sequence.prompt),
                                                   "cached_tokens": sequence.cached_tokens,
                                                   "thinking": thinking, **sequence.info}))  # fmt: skip
            if sequence.first_token_at is None:
                sequence.first_token_at = time.monotonic()
            drafts, sequence.drafts = sequence.drafts, []
            sequence.drafted += len(drafts)  # counted before _take may end the sequence (its `done` has the counts)
            taken = 0
            # A drafted token the model agrees with was decoded already: its row's logits give the next token.
            while self._take(sequence, token, events) and taken < len(drafts) and token == drafts[taken]:
                taken += 1
                sequence.accepted += 1
                sequence.batch_index += 1
                token = tokens[taken]
            if drafts:
                self.stats["drafted"] = self.stats.get("drafted", 0) + len(drafts)
                self.stats["accepted"] = self.stats.get("accepted", 0) + taken
                # Drafts that keep failing (text unlike its context) widen every step for nothing: draft fewer, down
                # to one, then rest for 2, 4, ... 64 steps between single drafts, until they hold again.
                window = sequence.draft_window or self.draft_max
                if taken == 0 and window > 1:
                    sequence.draft_window = window // 2
                elif taken == 0:
                    sequence.draft_misses += 1
                    sequence.draft_rest = min(2**sequence.draft_misses, 64)
                else:
                    sequence.draft_misses = 0
                    if taken == len(drafts):
                        sequence.draft_window = min(self.draft_max, window * 2)
                if taken < len(drafts):  # the cells of the drafts it did not take
                    rejected = len(drafts) - taken
                    llama_cpp.llama_memory_seq_rm(self.memory, sequence.slot.id, sequence.n_past - rejected, -1)
                    del sequence.slot.tokens[-rejected:]
                    sequence.n_past -= rejected
        stats = self.stats
        stats["steps"] += 1
        stats["batch_tokens"] += batch.n
        stats["decode_s"] += decoded - decode_started
        stats["sample_s"] += time.perf_counter() - decoded
        stats["step_s"] += time.perf_counter() - started
        # Publishing happens on the IO thread while the next step decodes; cancellations it found arrive here
        # one step later. Sequences that ended in this step are marked finished once their events are out.
        published = None
        if len(self._active) <= FIRST_TOKEN_WAIT_MAX and any(kind == "start" for _s, kind, _d in events):
            published = threading.Event()
        self._io_queue.put((events, list(self._active), self._ended, published))
        self._ended = []
        if published is not None:
            published.wait(0.05)
        with self._io_lock:
            cancelled, self._cancelled = self._cancelled, set()
            io_error, self._io_error = self._io_error, None
        for sequence in list(self._active):
            if io_error is not None:
                sequence.error = io_error
                self._finish(sequence, None)
            elif sequence in cancelled:
                self._finish(sequence, "cancelled")

    def _run_io(self) -> None:
        while True:
            item = self._io_queue.get()
            if item is None:
                return
            events, active, ended, published = item
            try:
                started = time.perf_counter()
                cancelled = self.io.step(events, active)
                self.stats["io_s"] += time.perf_counter() - started
            except Exception as exc:  # e.g. Redis went away: fail what is running, keep the thread
                logger.exception("publishing events failed for %s", self.path)
                with self._io_lock:
                    self._io_error = exc
                for sequence in ended:
                    sequence.error = sequence.error or exc
                cancelled = set()
            with self._io_lock:
                self._cancelled |= cancelled
            for sequence in ended:
                sequence.finished.set()
            if published is not None:
                published.set()

    def _sample(self, sequences: list[Sequence]) -> list[list[int]]:
        """Each sequence's tokens from its rows, each from its own sampler chain (`_sample_rows`). With a large
        vocabulary every chain walks all logits on the CPU (~0.3 ms each for Llama 3), so beyond a few sequences
        the chains run on a thread pool: ctypes releases the GIL, and the GPU would otherwise idle while they run
        one after another (with drafts, several rows each)."""

        here = [s for s in sequences if not s.on_backend]  # sampled in the graph: only their token is read
        if len(here) < PARALLEL_SAMPLING_MIN or self._sampling_pool is None:
            return [self._sample_rows(s) for s in sequences]
        for sequence in here:  # the first read of an output row may reorder llama.cpp's buffers: do it here
            llama_cpp.llama_get_logits_ith(self.ctx, sequence.batch_index)
        sampled = dict(zip(here, self._sampling_pool.map(self._sample_rows, here), strict=True))
        return [sampled[s] if s in sampled else self._sample_rows(s) for s in sequences]

    def _sample_rows(self, sequence: Sequence) -> list[int]:
        """The token after the sequence's next token and, while the model agrees with its drafts, the token after
        each draft, in order (its chain accepts each, as decoding them one by one would): a draft is taken when
        the token sampled before it equals it."""
        tokens = [self._sample_one(sequence, sequence.batch_index)]
        for i, draft in enumerate(sequence.drafts, start=1):
            if tokens[-1] != draft:
                break
            tokens.append(self._sample_one(sequence, sequence.batch_index + i))
        return tokens

    def _take(self, sequence: Sequence, token: int, events: list) -> bool:
        """One sampled token: its text and logprobs out, or the sequence's end. Whether it goes on generating."""
        if token < 0:  # a grammar dead end (its error is set)
            self._finish(sequence, None, events)
            return False
        if token in self._eog:
            self._finish(sequence, "stop", events)
            return False
        sequence.completion_tokens += 1
        sequence.next_token = token  # decoded (and added to slot.tokens) in the next step
        if sequence.params.logprobs is not None:
            sequence.logprobs.append(self._logprob(sequence.batch_index, token, sequence.params.logprobs))
        text = sequence.decoder.feed(self._piece(token, token in sequence.params.preserved_tokens))
        if text:
            events.append((sequence, "token", self._token_event(sequence, text)))
        if sequence.decoder.stop.stopped:
            self._finish(sequence, "stop", events)
        elif sequence.completion_tokens >= sequence.max_tokens:
            self._finish(sequence, "length", events)
        return sequence.finish_reason is None and sequence.error is None

    def _padding(self, generating: list[Sequence], room_in_batch: int) -> dict[Sequence, int]:
        """Rows to add after each generating sequence's own, so that all have as many: with a KV cache per slot,
        llama.cpp decodes a batch in passes of consecutive slots holding equally many tokens, and drafts of 1 to 8
        tokens beside sequences without any would make as many passes over the weights as there are lengths. A
        padding row asks for no logits, and its cell is removed after the decode. None with a shared cache
        (llama.cpp takes its tokens in order), or without drafts."""
        if self.shared_cells or not any(s.drafts for s in generating):
            return {}
        longest = 1 + max(len(s.drafts) for s in generating)
        padding = {}
        for sequence in generating:
            rows = 1 + len(sequence.drafts)
            # Within the slot's cells (n_past already counts its rows) and the batch.
            pad = min(longest - rows, self.n_ctx - sequence.n_past, room_in_batch)
            if pad > 0:
                padding[sequence] = pad
                room_in_batch -= pad
        return padding

    def _draft_all(self, room: int) -> int:
        """Draft tokens for the generating sequences (sequence.drafts), within the batch's room beside everyone's
        own token and the `room` the cache has; how many in all."""
        budget = min(self.n_batch - len(self._active), room)
        wants = []
        for sequence in self._active:
            if sequence.pending or sequence.waiting_for_leader or sequence.prefix_from is not None:
                continue
            if sequence.draft_rest:
                sequence.draft_rest -= 1
                continue
            window = sequence.draft_window or self.draft_max
            limit = min(window, sequence.max_tokens - sequence.completion_tokens - 1, budget)
            if limit > 0:
                wants.append((sequence, limit))
                budget -= limit
        if self.drafter is not None:
            owners = [(s.key, s.index) for s, _limit in wants]  # request ids are unique, object ids get reused
            drafted = self.drafter.draft([(s.slot.id, owner, s.slot.tokens, s.next_token, limit)
                                          for (s, limit), owner in zip(wants, owners, strict=True)])  # fmt: skip
        else:
            drafted = [self._draft(s, limit) for s, limit in wants]
        for (sequence, _limit), drafts in zip(wants, drafted, strict=True):
            sequence.drafts = drafts
        return sum(len(d) for d in drafted)

    def _draft(self, sequence: Sequence, limit: int) -> list[int]:
        """Prompt lookup: the tokens that followed the last place where the sequence's latest tokens (3, else 2)
        appeared before, in its prompt or its answer: an edit repeats what the prompt holds. Empty if none."""
        history = [*sequence.slot.tokens, sequence.next_token]
        data = array.array("i", history).tobytes()
        for n in (3, 2):
            if len(history) <= n:
                continue
            key, end = data[-4 * n :], len(data) - 4
            at = data.rfind(key, 0, end)
            while at > 0 and at % 4:  # only whole tokens
                at = data.rfind(key, 0, at + 4 * n - 1)
            if at >= 0 and not at % 4:
                start = at // 4 + n
                return history[start : start + limit]
        return []

    def _sample_one(self, sequence: Sequence, row: int) -> int:
        # With backend sampling, llama_sampler_sample returns the token the graph sampled (and tells the chain).
        if sequence.params.grammar:
            return self._sample_checked(sequence, row)
        return llama_cpp.llama_sampler_sample(sequence.sampler.sampler, self.ctx, row)

    def _sample_checked(self, sequence: Sequence, row: int) -> int:
        """llama_sampler_sample, step by step, for a sequence under a grammar. When the grammar rejects every
        token, llama.cpp's samplers still pick one, and the grammar's accept then throws a C++ exception that
        aborts the whole worker; here the pick is checked first, and a dead end is this sequence's error (-1)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        candidates = np.empty(self.n_vocab, _TOKEN_DATA)
        candidates["id"] = np.arange(self.n_vocab, dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=candidates.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=self.n_vocab, selected=-1, sorted=False,
        )  # fmt: skip
        llama_cpp.llama_sampler_apply(sequence.sampler.sampler, ctypes.byref(array))
        chosen = array.data[array.selected] if 0 <= array.selected < array.size else None
        if chosen is None or not math.isfinite(chosen.logit):
            if sequence.params.ignore_eos:  # the grammar is complete and allows only the end, which is banned
                return self.eog_tokens[0]
            sequence.error = GrammarDeadEnd(
                "The output format this request asks for (its JSON schema, pattern or tools) cannot be continued: "
                "its grammar allows no token the model can write next (for example, a pattern that requires a NUL "
                "character)."
            )
            return -1
        llama_cpp.llama_sampler_accept(sequence.sampler.sampler, chosen.id)
        return chosen.id

    def _token_event(self, sequence: Sequence, text: str) -> dict:
        event = {"index": sequence.index, "text": text}
        if sequence.logprobs:
            event["logprobs"], sequence.logprobs = sequence.logprobs, []
        return event

    def _logprob(self, batch_index: int, token: int, top: int) -> dict:
        """The chosen token's log-probability under the model (before sampling settings) and the top ones."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, batch_index), shape=(self.n_vocab,))
        peak = float(logits.max())
        log_total = peak + math.log(float(np.exp(logits - peak).sum()))
        entry = self._logprob_entry(token, float(logits[token]) - log_total)
        if top:
            best = np.argpartition(-logits, top)[:top]
            best = best[np.argsort(-logits[best])]
            entry["top_logprobs"] = [self._logprob_entry(int(t), float(logits[t]) - log_total) for t in best]
        return entry

    def _logprob_entry(self, token: int, logprob: float) -> dict:
        piece = self._piece(token)
        return {"token": piece.decode(errors="replace"), "logprob": round(logprob, 6), "bytes": list(piece)}

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token, a special token's text only if `special` (cached: the scheduler asks for every
        generated token)."""
        key = -token - 1 if special else token
        piece = self._pieces.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            piece = self._pieces[key] = buf.raw[:n]
        return piece

    def _finish(self, sequence: Sequence, reason: str | None, events: list | None = None) -> None:
        """Take the sequence out of the batch at once; its slot keeps the KV cells for prefix reuse."""
        if reason in ("stop", "length") and events is not None:
            tail = sequence.decoder.flush()
            if tail or sequence.logprobs:
                events.append((sequence, "token", self._token_event(sequence, tail)))
            done = {
                "index": sequence.index,
                "finish_reason": reason,
                "prompt_tokens": len(sequence.prompt),
                "completion_tokens": sequence.completion_tokens,
                "cached_tokens": sequence.cached_tokens,
                "accepted_prediction_tokens": sequence.accepted,
                "rejected_prediction_tokens": sequence.drafted - sequence.accepted,
            }
            if sequence.decoder.stop.matched is not None:  # which stop string ended it (Anthropic reports it)
                done["stop_sequence"] = sequence.decoder.stop.matched
            events.append((sequence, "done", done))
        for follower in self._active:
            if follower.leader is sequence and follower.waiting_for_leader:  # the leader ended before its prompt
                follower.error = sequence.error
                self._finish(follower, reason, events)
        sequence.finish_reason = reason
        if sequence in self._active:
            self._active.remove(sequence)
        if sequence.slot is not None:
            slot = sequence.slot
            if reason is None or sequence.pending:  # half-written or failed: the cache is not trustworthy
                llama_cpp.llama_memory_seq_rm(self.memory, slot.id, -1, -1)
                slot.tokens = []
            slot.sequence, slot.last_used = None, time.monotonic()
        if sequence.on_backend:  # before its chain is freed: llama.cpp holds a pointer to it
            llama_cpp.llama_set_sampler(self.ctx, sequence.slot.id, None)
            sequence.on_backend = False
        if sequence.sampler is not None:
            sequence.sampler.close()
            sequence.sampler = None
        self.last_used = time.monotonic()
        if events is None:  # nothing of this sequence is waiting to be published
            sequence.finished.set()
        else:
            self._ended.append(sequence)

    def _sampler(self, params: SamplingParams) -> _internals.LlamaSampler:
        """A sampler chain for one sequence, in llama-server's order."""
        sampler = _internals.LlamaSampler()
        bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < self.n_vocab}
        if params.ignore_eos:
            bias.update({t: -math.inf for t in self.eog_tokens})
        if bias:
            sampler.add_logit_bias(self.n_vocab, bias)
        if params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            sampler.add_penalties(
                self.n_vocab, params.repeat_last_n, params.repeat_penalty, params.frequency_penalty,
                params.presence_penalty,
            )  # fmt: skip
        if params.grammar:
            grammar = self._grammar_sampler(params.grammar, params.grammar_triggers)
            if not grammar:
                sampler.close()
                raise GrammarUncompilable("The grammar made of this request's tools or response_format could not "
                                          "be compiled.")  # fmt: skip
            llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar)
        if params.temperature <= 0:
            sampler.add_greedy()
            return sampler
        if params.top_k > 0:
            sampler.add_top_k(params.top_k)
        if params.top_p < 1.0:
            sampler.add_top_p(params.top_p, 1)
        if params.min_p > 0:
            sampler.add_min_p(params.min_p, 1)
        sampler.add_temp(params.temperature)
        sampler.add_dist(params.seed if params.seed is not None else random.getrandbits(32))
        return sampler

    def _grammar_sampler(self, grammar: str, triggers: list[str]):
        if not triggers:
            return llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        patterns = (ctypes.c_char_p * len(triggers))(*[t.encode() for t in triggers])
        return llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            self.vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0
        )
