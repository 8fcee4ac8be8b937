"""Splitting a thinking model's `<think>...</think>` from its answer (a leaf module, like protocol.py).

Text arrives in deltas that may cut a tag anywhere (`<thi` + `nk>`), so the splitter holds back what could
still become a tag. A template that opens the thinking itself (its generation prompt ends in `<think>`) starts
the splitter inside it."""

OPEN, CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    def __init__(self, *, thinking: bool = False):
        self.state = "thinking" if thinking else "start"  # start -> (thinking -> after ->) answer
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that is safe to emit for this delta."""
        self.pending += text
        reasoning = content = ""
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(OPEN):
                    self.pending, self.state = stripped[len(OPEN) :], "thinking"
                    continue
                if OPEN.startswith(stripped):  # could still become <think>: wait
                    return reasoning, content
                self.state = "answer"
            if self.state == "thinking":
                end = self.pending.find(CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end]
                    self.pending, self.state = self.pending[end + len(CLOSE) :], "after"
                    continue
                keep = _partial_suffix(self.pending, CLOSE)
                reasoning += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return reasoning, content
            if self.state == "after":  # the newlines between the thought and the answer belong to neither
                self.pending = self.pending.lstrip("\n")
                if not self.pending:
                    return reasoning, content
                self.state = "answer"
            content += self.pending
            self.pending = ""
            return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is left when the answer ends (an unclosed thought stays reasoning)."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.state == "thinking" else ("", rest)


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
