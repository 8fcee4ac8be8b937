"""Embeddings with llama.cpp: one context per model with pooling on, and a scheduler thread that packs the inputs
of every waiting caller into one `llama_decode` (one sequence id per input), then hands each caller its vectors.

The model pools with its own pooling type when its GGUF declares one (a BERT checkpoint's mean or CLS), else
mean pooling (a causal LM such as SmolLM2); vectors are L2-normalised. Pooling happens per micro-batch inside
llama.cpp, so the context is built with n_ubatch = n_batch = n_ctx: a batch is always one micro-batch, and an
input never spans two (which would pool only its last part, and which non-causal models refuse outright).

Flash attention is on (as in llama-server): without it llama.cpp scores every token of a batch against every
other (n_head x n_ctx² floats, masked per sequence), which on the CPU made a 1024-token batch of MiniLM inputs 5x
slower than embedding them one by one. Its price: the CPU kernel rounds through F16 once a batch passes ~64
tokens, so a vector moves slightly with what shares its batch (MiniLM ~1e-4 per component, SmolLM2 cosine
0.9995); `flash_attn=False` gives vectors identical alone or batched (to 1e-7)."""

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp import _internals

from models_app.metadata import ENCODER_ARCHITECTURES  # run without a KV cache

from .batch import Batch
from .host import cpu_has_amx, usable_cpus
from .llama import ContextOverflow, EngineError, PromptError

logger = logging.getLogger(__name__)

POOLINGS = {llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean", llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
            llama_cpp.LLAMA_POOLING_TYPE_LAST: "last"}  # fmt: skip


def embedding_context_bytes(summary: dict, n_ctx: int, n_seq_max: int = 64, *, flash_attn: bool = True) -> int:
    """Memory an embedding context of `n_ctx` tokens per batch needs beside the weights, from a GGUF summary
    (models_app.metadata): a KV cache (decoders only), the compute buffer (activations, the attention scores
    without flash attention, and for a decoder the logits llama.cpp computes for every token) and the output
    buffer. Checked against llama.cpp 0.3.36's own report on the CPU (with flash attention: MiniLM-L6 7.7 MiB at
    512 tokens, 31 MiB at 2048; SmolLM2-135M 114 and 449 MiB; without: MiniLM-L6 19 and 228 MiB, SmolLM2 114 and
    460 MiB): this errs high, by 4 to 12 %."""
    embd = summary.get("embedding_length") or 0
    layers = summary.get("block_count") or 0
    vocab = summary.get("vocab_size") or 0
    ff = summary.get("feed_forward_length") or 4 * embd
    heads = summary.get("head_count") or 1
    encoder = summary.get("architecture") in ENCODER_ARCHITECTURES
    kv = 0
    if not encoder:
        heads_kv = summary.get("head_count_kv") or heads
        k = summary.get("key_length") or embd // heads
        v = summary.get("value_length") or embd // heads
        kv = layers * n_ctx * heads_kv * (k + v) * 2  # f16 cells
    scores = 0 if flash_attn else heads * n_ctx * n_ctx * 4
    logits = 0 if encoder else n_ctx * vocab * 4
    # Activations and the f16 attention mask, plus the larger of scores and logits (never alive together).
    compute = n_ctx * (ff + 4 * embd) * 4 + n_ctx * n_ctx * 2 + max(scores, logits)
    output = n_seq_max * embd * 4 + (vocab * 4 if not encoder else 0) + (1 << 20)
    return int((kv + compute + output) * 1.05)  # llama.cpp's allocator pads a little beyond this count


@dataclass
class EmbeddingRequest:
    """One caller's inputs inside the scheduler; the caller waits on `finished`, then reads `vectors`."""

    inputs: list[list[int]]
    vectors: list[list[float] | None] = field(default_factory=list)
    error: Exception | None = None
    remaining: int = 0
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.vectors = [None] * len(self.inputs)
        self.remaining = len(self.inputs)

    def wait(self, timeout: float | None = None) -> bool:
        return self.finished.wait(timeout)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


class EmbeddingModel:
    def __init__(self, path: str, *, n_ctx: int = 1024, n_seq_max: int = 64, n_gpu_layers: int = 0,
                 n_threads: int | None = None, flash_attn: bool = True):  # fmt: skip
        """Load the model and one embedding context: `n_ctx` is the token budget of one batch (and the most
        tokens one input may have, capped by the model's training context); `n_seq_max` the most inputs in it."""
        self.path = path
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 999 if n_gpu_layers < 0 else n_gpu_layers
        mparams.use_extra_bufts = not cpu_has_amx()
        self.model = _internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.metadata = self.model.metadata()
        arch = self.metadata.get("general.architecture", "")
        declared = int(self.metadata.get(f"{arch}.pooling_type", llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED))
        # The model's own pooling when it declares a usable one; else mean (NONE is per-token, RANK a score).
        self.pooling_type = declared if declared in POOLINGS else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        self.pooling = POOLINGS[self.pooling_type]
        n_ctx = max(1, n_ctx)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = self.n_seq_max = max(1, min(n_seq_max, 256, n_ctx))  # 256: llama.cpp's LLAMA_MAX_SEQ
        cparams.embeddings = True
        cparams.pooling_type = self.pooling_type
        # One KV stream for every sequence id: llama.cpp then splits a batch "simply" (one micro-batch when it
        # fits), where per-sequence streams would split it into equal-length pieces and pool each piece alone.
        cparams.kv_unified = True
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)  # fmt: skip
        cparams.no_perf = True
        cparams.n_threads = cparams.n_threads_batch = n_threads or usable_cpus()
        self.context = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)  # None for encoder-only models (no KV cache)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_ctx = min(self.n_batch, self.model.n_ctx_train() or self.n_batch)  # per input
        self.n_embd = llama_cpp.llama_model_n_embd_out(self.model.model)
        self.size_bytes = self.model.size()
        summary = {
            "architecture": arch,
            "embedding_length": llama_cpp.llama_model_n_embd(self.model.model),
            "block_count": llama_cpp.llama_model_n_layer(self.model.model),
            "head_count": llama_cpp.llama_model_n_head(self.model.model),
            "head_count_kv": llama_cpp.llama_model_n_head_kv(self.model.model),
            "vocab_size": self.n_vocab,
            "feed_forward_length": int(self.metadata.get(f"{arch}.feed_forward_length", 0)) or None,
        }
        self.context_bytes = embedding_context_bytes(summary, self.n_batch, self.n_seq_max, flash_attn=flash_attn)

        self._batch = _EmbedBatch(self.n_batch)
        self._waiting: collections.deque[tuple[EmbeddingRequest, int]] = collections.deque()  # (request, input)
        self._wakeup = threading.Condition()
        self._closed = False
        self.last_used = time.monotonic()
        self.stats = {"batches": 0, "inputs": 0, "tokens": 0, "decode_s": 0.0}
        self._thread = threading.Thread(target=self._run, name=f"embed:{path}", daemon=True)
        self._thread.start()

    # -- requests ----------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokenize one input with the model's own special tokens ([CLS] ... [SEP] for BERT, BOS if wanted)."""
        return self.model.tokenize(text.encode(), add_bos=True, special=False)

    def submit(self, inputs: list[list[int]], *, truncate: bool = False) -> EmbeddingRequest:
        """Check the inputs (ids in the vocabulary, not empty, each fitting the context unless `truncate` cuts
        it) and queue them for the next batch."""
        if not inputs:
            raise PromptError("There is nothing to embed.")
        checked = []
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise PromptError(f"Input {i} is empty.")
            if any(not 0 <= t < self.n_vocab for t in tokens):
                raise PromptError(f"Input {i} contains token ids outside the vocabulary (0..{self.n_vocab - 1}).")
            if len(tokens) > self.n_ctx:
                if not truncate:
                    raise ContextOverflow(
                        len(tokens), self.n_ctx,
                        message=f"This model's maximum context length is {self.n_ctx} tokens. However, input {i} "
                        f"has {len(tokens)} tokens. Please reduce the length of the input.",
                    )  # fmt: skip
                tokens = tokens[: self.n_ctx]
            checked.append(list(tokens))
        request = EmbeddingRequest(checked)
        with self._wakeup:
            if self._closed:
                raise EngineError("The model is being unloaded.")
            self._waiting.extend((request, i) for i in range(len(checked)))
            self.last_used = time.monotonic()
            self._wakeup.notify()
        return request

    def embed(self, inputs: list[list[int]], *, truncate: bool = False) -> list[list[float]]:
        """The normalised vector of each input, in order; batched with whatever other callers are waiting."""
        request = self.submit(inputs, truncate=truncate)
        request.wait()
        if request.error is not None:
            raise request.error
        return request.vectors

    def busy_slots(self) -> int:
        """Inputs queued or being embedded (the cache's and metrics' notion of "busy")."""
        return len(self._waiting)

    def close(self) -> None:
        """Stop the scheduler (failing anything still queued) and free the context and the model."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=30)
        self.context.close()
        self.model.close()

    # -- the scheduler thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._closed and not self._waiting:
                    self._wakeup.wait()
                if self._closed:
                    break
                # Everything waiting, up to the token and sequence budget: callers that arrived while the last
                # batch ran share this one.
                taken, tokens = [], 0
                while self._waiting and len(taken) < self.n_seq_max:
                    request, i = self._waiting[0]
                    if taken and tokens + len(request.inputs[i]) > self.n_batch:
                        break
                    taken.append(self._waiting.popleft())
                    tokens += len(request.inputs[i])
            try:
                vectors = self._decode([request.inputs[i] for request, i in taken])
            except Exception as exc:  # a failed batch fails its requests; the thread lives on
                logger.exception("embedding batch failed for %s", self.path)
                vectors = [exc] * len(taken)
            for (request, i), vector in zip(taken, vectors, strict=True):
                if isinstance(vector, Exception):
                    request.error = request.error or vector
                else:
                    request.vectors[i] = vector
                request.remaining -= 1
                if request.remaining == 0:
                    request.finished.set()
            self.last_used = time.monotonic()
        with self._wakeup:
            for request, _ in self._waiting:
                request.error = EngineError("The model was unloaded.")
                request.finished.set()
            self._waiting.clear()

    def _decode(self, inputs: list[list[int]]) -> list[list[float]]:
        """One llama_decode over every input (sequence id = its place in the batch); read each pooled vector."""
        started = time.perf_counter()
        batch = self._batch
        batch.clear()
        for seq_id, tokens in enumerate(inputs):
            batch.add(tokens, seq_id)
        if self.memory is not None:  # a decoder keeps KV cells: the previous batch's sequences must go
            llama_cpp.llama_memory_clear(self.memory, True)
        code = llama_cpp.llama_decode(self.ctx, batch.struct)
        if code != 0:
            raise EngineError(f"llama_decode returned {code}")
        vectors = []
        for seq_id in range(len(inputs)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq_id)
            if not pointer:
                raise EngineError(f"llama.cpp returned no embedding for sequence {seq_id}")
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
            norm = np.linalg.norm(vector)
            vectors.append((vector / norm if norm > 0 else vector).tolist())
        stats = self.stats
        stats["batches"] += 1
        stats["inputs"] += len(inputs)
        stats["tokens"] += batch.n
        stats["decode_s"] += time.perf_counter() - started
        return vectors


class _EmbedBatch(Batch):
    """The scheduler's llama_batch, with every token an output (llama.cpp pools them)."""

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.logits[:] = 1  # in place: the struct points at this array

    def add(self, tokens: list[int], seq_id: int) -> None:
        n, k = self.n, len(tokens)
        self.token[n : n + k] = tokens
        self.pos[n : n + k] = np.arange(k, dtype=np.int32)
        self.seq_id[n : n + k] = seq_id
        self.n = self.struct.n_tokens = n + k
