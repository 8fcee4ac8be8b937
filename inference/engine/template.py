"""Chat templates (Jinja, as in Hugging Face tokenizer configs) rendered in a sandbox with a time and size limit.

A template comes from the model file or from an admin, so it is untrusted code: Jinja's immutable sandbox blocks
attribute tricks (`__globals__`, `''.__class__`); on top of it, every loop, call and attribute lookup checks a
deadline, `*`, `**` and `+` refuse results over the size limit, and the output is cut off at the size limit, so
neither `'a' * 10**9` nor nested loops over `range(10**5)` can hold a worker's memory or thread."""

import json
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 100_000  # items one range() may yield (Jinja's own sandbox limit)
CHECK_EVERY = 1024  # loop iterations between two deadline checks


class ChatTemplateError(Exception):
    """The template failed, was refused by the sandbox, or went over its time or size limit."""


class _Generation(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}` tag (marks assistant text for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Budget:
    """The limits of one render: a deadline and a size in characters."""

    def __init__(self, timeout: float, max_chars: int):
        self.deadline = time.monotonic() + timeout
        self.timeout, self.max_chars = timeout, max_chars

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"The chat template took longer than {self.timeout:g} s to render.")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise ChatTemplateError(f"The chat template's output would exceed {self.max_chars} characters.")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self):
        super().__init__(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                         extensions=[_Generation, jinja2.ext.loopcontrols])  # fmt: skip
        self.budget: _Budget | None = None  # set for the duration of one render (one thread renders at a time)

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > 4096:
                raise ChatTemplateError("The chat template computes a number too large to render.")
        elif operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, str | list | tuple) and isinstance(count, int):
                self.budget.size(len(sized) * count)
        elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            self.budget.size(len(left) + len(right))
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj, attribute):
        # Jinja's default renders a forbidden attribute as an empty value; say so instead.
        raise ChatTemplateError(f"The chat template tried to read {attribute!r}, which the sandbox forbids.")

    def call(self, context, obj, *args, **kwargs):
        self.budget.check()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        self.budget.check()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        self.budget.check()
        return super().getitem(obj, argument)

    def bounded_iter(self, iterable):
        """Every `for` loop iterates through this, so even an empty loop body meets the deadline."""
        for i, item in enumerate(iterable):
            if i % CHECK_EVERY == 0:
                self.budget.check()
            yield item

    def bounded_range(self, *args):
        values = range(*args)
        if len(values) > MAX_RANGE:
            raise ChatTemplateError(f"The chat template asks for a range of more than {MAX_RANGE} items.")
        return values


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Transformers' tojson: unicode kept, indent allowed (Jinja's own escapes HTML and has no ensure_ascii).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise ChatTemplateError(f"The chat template refused the messages: {message}")


class ChatTemplate:
    """One model's chat template, compiled once; `render` is safe to call from several threads."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", timeout: float = 2.0,
                 max_chars: int = 4_000_000):  # fmt: skip
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.timeout, self.max_chars = timeout, max_chars
        self._environment = _Sandbox()
        self._environment.filters["tojson"] = _tojson
        self._environment.globals.update(range=self._environment.bounded_range, raise_exception=_raise_exception,
                                         strftime_now=lambda fmt: datetime.now().strftime(fmt))  # fmt: skip
        try:
            tree = self._environment.parse(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"The chat template does not compile: {exc}") from None
        for loop in tree.find_all(nodes.For):  # route every loop through bounded_iter
            loop.iter = nodes.Call(nodes.Name("__minerva_iter", "load"), [loop.iter], [], None, None)
        self._environment.globals["__minerva_iter"] = self._environment.bounded_iter
        self._template = self._environment.from_string(tree)
        self._environment_lock = threading.Lock()

    def render(self, messages: list[dict], **variables) -> str:
        """The prompt text for `messages`, ending with the assistant's generation prompt."""
        budget = _Budget(self.timeout, self.max_chars)
        with self._environment_lock:  # the budget lives on the environment: one render at a time
            self._environment.budget = budget
            try:
                parts, size = [], 0
                for part in self._template.generate(messages=messages, bos_token=self.bos_token,
                                                    eos_token=self.eos_token, add_generation_prompt=True,
                                                    **variables):  # fmt: skip
                    size += len(part)
                    budget.size(size)
                    budget.check()
                    parts.append(part)
                return "".join(parts)
            except ChatTemplateError:
                raise
            except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                    ZeroDivisionError, OverflowError, RecursionError, MemoryError) as exc:  # fmt: skip
                raise ChatTemplateError(f"The chat template failed: {type(exc).__name__}: {exc}") from None
            finally:
                self._environment.budget = None
