"""The token batch the engine and its draft model hand to llama_decode."""

import ctypes

import llama_cpp
import numpy as np


class Batch:
    """A llama_batch over numpy arrays we own, so filling it is a few vectorised slice assignments."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq_id = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        int_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq_id.ctypes.data
        self._seq_ptrs = (int_p * capacity)(*[ctypes.cast(base + 4 * i, int_p) for i in range(capacity)])
        self.struct = llama_cpp.llama_batch()
        self.struct.token = self.token.ctypes.data_as(int_p)
        self.struct.embd = None
        self.struct.pos = self.pos.ctypes.data_as(int_p)
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(int_p)
        self.struct.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(int_p))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.n = 0

    def clear(self) -> None:
        self.n = self.struct.n_tokens = 0

    def room(self) -> int:
        return self.capacity - self.n

    def add(self, tokens: list[int], start_pos: int, seq_id: int, logits: int, padding: int = 0) -> int:
        """Append tokens of one sequence, the last `logits` of them with logits, then `padding` more rows (the last
        token again, at the next positions, without logits); return the batch index of the last of `tokens`."""
        n, k = self.n, len(tokens)
        self.token[n : n + k] = tokens
        self.token[n + k : n + k + padding] = tokens[-1]
        self.pos[n : n + k + padding] = np.arange(start_pos, start_pos + k + padding, dtype=np.int32)
        self.seq_id[n : n + k + padding] = seq_id
        self.logits[n : n + k + padding] = 0
        self.logits[n + k - logits : n + k] = 1
        self.n = self.struct.n_tokens = n + k + padding
        return n + k - 1
