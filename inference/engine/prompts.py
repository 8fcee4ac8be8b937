"""Prompts kept in host memory beyond the slots (llama-server's `--cache-ram`): when a slot is given to an unrelated
prompt, the KV cells of what it held are saved here (`llama_state_seq_get_data`), and a later prompt that starts
with those tokens loads them back into its slot instead of computing them again. An agent that comes back to its
conversation after other requests took its slot continues where it was."""

import collections

import numpy as np

# A prompt shorter than this is cheap to compute again: not worth its copy.
PROMPT_CACHE_MIN_TOKENS = 128


SAVES_BEFORE_JUDGING = 32  # saves made before PromptCache.worth_saving looks at how many came back


class PromptCache:
    """Saved sequences (their tokens and llama.cpp's state bytes), least recently used first out once their bytes
    pass `limit_bytes`. Only the scheduler thread uses it."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._entries: collections.OrderedDict[tuple[int, ...], np.ndarray] = collections.OrderedDict()
        self.bytes = 0
        # Recent saves and the saved sequences taken back since, both decayed by each save (worth_saving).
        self._recent_puts = self._recent_takes = 0.0
        self._puts = self._declined = 0

    def worth_saving(self) -> bool:
        """Whether a save that stalls running sequences pays: yes for the first SAVES_BEFORE_JUDGING (agents come back
        only after others took their slots), then while at least one in four recent saves came back; otherwise one
        in eight, to notice when they start coming back (distinct prompts, which never do)."""
        if self._puts < SAVES_BEFORE_JUDGING or self._recent_takes * 4 >= self._recent_puts:
            return True
        self._declined += 1
        return self._declined % 8 == 0

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: list[int]) -> tuple[tuple[int, ...] | None, int]:
        """The saved sequence sharing the longest beginning with `prompt`, and how many tokens it shares."""
        best, length, prompt = None, 0, tuple(prompt)
        for tokens in self._entries:
            shared = common_prefix(tokens, prompt)
            if shared > length:
                best, length = tokens, shared
        return best, length

    def put(self, tokens: list[int], state: np.ndarray) -> None:
        """Keep a sequence's state. Saved sequences that are beginnings of this one go: it holds them."""
        key = tuple(tokens)
        if len(state) > self.limit_bytes:
            return
        for other in [t for t in self._entries if len(t) <= len(key) and key[: len(t)] == t]:
            self.bytes -= len(self._entries.pop(other))
        self._entries[key] = state
        self.bytes += len(state)
        self._recent_puts, self._recent_takes = self._recent_puts * 0.97 + 1, self._recent_takes * 0.97
        self._puts += 1
        while self.bytes > self.limit_bytes:
            self.bytes -= len(self._entries.popitem(last=False)[1])

    def take(self, tokens: tuple[int, ...]) -> np.ndarray | None:
        """Remove and return a saved sequence's state (it is going back into a slot, which holds it from then on);
        None if it is no longer here."""
        state = self._entries.pop(tokens, None)
        if state is not None:
            self.bytes -= len(state)
            self._recent_takes += 1
        return state


def common_prefix(a, b) -> int:
    """How many tokens two token sequences of one type (lists, or tuples) share from their start. Compared 64 at a
    time first: a slice comparison runs in C, so thousands of shared tokens cost microseconds, not a Python loop."""
    n = min(len(a), len(b))
    i = 0
    while i + 64 <= n and a[i : i + 64] == b[i : i + 64]:
        i += 64
    while i < n and a[i] == b[i]:
        i += 1
    return i
