"""Speculative decoding with a draft model: a small model with the served model's vocabulary proposes each
sequence's next tokens (greedily), and the served model verifies them in its own step (LoadedModel._step), keeping
those it would have chosen itself. llama-server's `--model-draft`."""

import logging

import llama_cpp
import numpy as np
from llama_cpp import _internals

from .batch import Batch
from .host import cpu_has_amx, usable_cpus
from .prompts import common_prefix

logger = logging.getLogger(__name__)

# Token ids below this may differ between a model and its draft (control tokens added late); llama-server's
# common_speculative_are_compatible compares the texts of the rest, as here.
_VOCAB_CHECK_FROM = 5


class DraftIncompatible(ValueError):
    """The draft model cannot draft for this model (another vocabulary)."""


class DraftModel:
    """The draft model's weights and a KV cache that mirrors the served model's slots: sequence id = slot id, and
    `tokens[slot]` is exactly what its cells hold for that slot, so each call decodes only what changed since (the
    tokens the served model took, the prompt of a new request), then drafts."""

    def __init__(self, path: str, target: _internals.LlamaModel, *, n_ctx: int, n_parallel: int, n_gpu_layers: int,
                 n_threads: int, n_batch: int, shared_cells: bool, draft_max: int):  # fmt: skip
        self.path = path
        # Between two steps of one sequence only its last tokens can differ from what the draft holds (the drafts it
        # did not keep): that tail is compared, not the whole context, each step.
        self.tail = draft_max + 64
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 999 if n_gpu_layers < 0 else n_gpu_layers
        mparams.use_extra_bufts = not cpu_has_amx()  # see LoadedModel (what a draft's rows round to is only a guess)
        self.model = _internals.LlamaModel(path_model=path, params=mparams, verbose=False)
        try:
            self._check_vocab(target)
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx if shared_cells else n_ctx * n_parallel
            cparams.n_batch = n_batch
            cparams.n_ubatch = min(n_batch, 512)
            cparams.n_seq_max = n_parallel
            # One cache for all slots (the cells of a cache per slot): llama.cpp decodes a batch over caches per slot
            # in passes of consecutive slots with as many tokens each, and the sequences catching up here hold 1 to 9.
            cparams.kv_unified = True
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
            cparams.no_perf = True
            cparams.n_threads = cparams.n_threads_batch = n_threads or usable_cpus()
            self.context = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        except Exception:
            self.model.close()
            raise
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = self.model.n_vocab()
        self.tokens: list[list[int]] = [[] for _ in range(n_parallel)]
        self.owners: list[object] = [None] * n_parallel  # the sequence each slot's cells were last drafted for
        self._batch = Batch(n_batch)

    def _check_vocab(self, target: _internals.LlamaModel) -> None:
        n_target, n_draft = target.n_vocab(), self.model.n_vocab()
        if n_target != n_draft:
            raise DraftIncompatible(
                f"the draft model {self.path} has a vocabulary of {n_draft} tokens, the model {n_target}; "
                "a draft model must share the model's tokenizer"
            )
        for token in range(_VOCAB_CHECK_FROM, n_target):
            if target.token_get_text(token) != self.model.token_get_text(token):
                raise DraftIncompatible(
                    f"token {token} is {target.token_get_text(token)!r} for the model and "
                    f"{self.model.token_get_text(token)!r} for the draft model {self.path}; a draft model must share "
                    "the model's tokenizer"
                )

    def draft(self, wants: list[tuple[int, object, list[int], int, int]]) -> list[list[int]]:
        """For each (slot, owner, held, next_token, limit): up to `limit` tokens the draft model expects after what
        the slot holds (`held`, not copied) and the token about to be decoded; `owner` names the sequence (a new one
        is compared whole). A decode the draft's cache has no room for drafts nothing this time: drafting is an
        optimisation, never a failure (nor can a wrong draft change the text: the model verifies it)."""
        drafts: list[list[int]] = [[] for _ in wants]
        todo: dict[int, list[int]] = {}  # want index -> tokens to decode before its first draft
        for i, (slot, owner, held, next_token, _limit) in enumerate(wants):
            mine = self.tokens[slot]
            start = min(max(0, len(mine) - self.tail), len(held)) if self.owners[slot] == owner else 0
            keep = start + common_prefix(mine[start:], held[start:])  # at most len(held): next_token gives logits
            llama_cpp.llama_memory_seq_rm(self.memory, slot, keep, -1)
            del mine[keep:]
            self.owners[slot] = owner
            todo[i] = [*held[keep:], next_token]
        try:
            while todo:  # catch up, a batch at a time; a sequence whose history is in drafts its first token
                batch, rows = self._batch, {}
                batch.clear()
                for i, tokens in list(todo.items()):
                    if not batch.room():
                        break
                    slot = wants[i][0]
                    chunk = tokens[: batch.room()]
                    last = batch.add(chunk, len(self.tokens[slot]), slot, logits=1 if len(chunk) == len(tokens) else 0)
                    self.tokens[slot].extend(chunk)
                    todo[i] = tokens[len(chunk) :]
                    if not todo[i]:
                        rows[i] = last
                        del todo[i]
                self._decode()
                for i, token in zip(rows, self._argmax(len(rows)), strict=True):
                    drafts[i].append(token)
            while True:  # then one token per sequence and decode, until each has its limit
                batch, rows = self._batch, {}
                batch.clear()
                for i, (slot, *_, limit) in enumerate(wants):
                    if drafts[i] and len(drafts[i]) < limit:
                        rows[i] = batch.add([drafts[i][-1]], len(self.tokens[slot]), slot, logits=1)
                        self.tokens[slot].append(drafts[i][-1])
                if not rows:
                    break
                self._decode()
                for i, token in zip(rows, self._argmax(len(rows)), strict=True):
                    drafts[i].append(token)
        except _NoRoom:
            self.clear()
            return [[] for _ in wants]
        return [d[: want[-1]] for d, want in zip(drafts, wants, strict=True)]

    def _decode(self) -> None:
        code = llama_cpp.llama_decode(self.ctx, self._batch.struct)
        if code != 0:
            logger.warning("the draft model %s could not decode (llama_decode returned %s); no drafts", self.path, code)
            raise _NoRoom

    def _argmax(self, outputs: int) -> list[int]:
        """The most likely token of each of the last decode's `outputs` rows with logits, in batch order (llama.cpp
        keeps them so, one after another): one numpy call for all rows."""
        if not outputs:
            return []
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(outputs, self.n_vocab))
        return logits.argmax(axis=1).tolist()

    def clear(self) -> None:
        """Forget every slot's cells (the next call decodes their histories again)."""
        llama_cpp.llama_memory_clear(self.memory, True)
        self.tokens = [[] for _ in self.tokens]
        self.owners = [None] * len(self.tokens)

    def close(self) -> None:
        self.context.close()
        self.model.close()


class _NoRoom(Exception):
    pass
