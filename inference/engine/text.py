"""Turning generated token bytes into text deltas: incremental UTF-8 decoding and stop strings."""

import codecs


class StopMatcher:
    """Feeds text through, holding back any tail that could still become a stop string.

    `feed` returns the text that is safe to emit; once a stop string appears, `stopped` is set and the text
    from the stop string on is dropped (OpenAI does not include the stop sequence in the output)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        found = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            cut, self.matched = min(found, key=lambda f: f[0])
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """The held-back tail, when generation ends without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class TextDecoder:
    """Token bytes in, text out: one incremental UTF-8 decoder, so a character split across tokens is never
    emitted as U+FFFD, and streamed text equals the non-streamed text."""

    def __init__(self, stops: list[str]):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = StopMatcher(stops)

    def feed(self, data: bytes) -> str:
        return self.stop.feed(self._utf8.decode(data))

    def flush(self) -> str:
        """The end: held text goes out; the start of a character the answer never finished (cut by max_tokens) is
        dropped, as llama-server drops it, rather than sent as U+FFFD."""
        self._utf8.reset()
        return self.stop.flush()
