"""Chat templates (Jinja, as in Hugging Face tokenizer configs) rendered in a sandbox with a time and size limit.

A template comes from the model file or from an admin, so it is untrusted code: Jinja's immutable sandbox blocks
attribute tricks (`__globals__`, `''.__class__`); on top of it, every loop, call and attribute lookup checks a
deadline, and every operation that can build a string or a list (each operator, filter and method call, `~`, and
each `{{ }}` output) is bounded twice: what it would build is estimated before it runs (`'%99999999s' % x`,
`x|center(10**8)`, `', '.join([s] * 1000)` are refused without being built) and measured after, and all the text
one render makes counts against a budget of a few times the size limit. So no template, however small, can hold a
worker's memory or thread: it fails with ChatTemplateError, a 400 for requests to its model only."""

import functools
import itertools
import json
import re
import threading
import time
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_RANGE = 100_000  # items one range() may yield (Jinja's own sandbox limit)
CHECK_EVERY = 1024  # loop iterations between two deadline checks
MADE_PER_OUTPUT = 8  # all the text one render makes, in all its operations: this many times its size limit
MAX_INT_BITS = 65_536  # integers a template may compute (str() of a bigger one is refused by Python anyway)


class ChatTemplateError(Exception):
    """The template failed, was refused by the sandbox, or went over its time or size limit."""


class _Generation(jinja2.ext.Extension):
    """Hugging Face's `{% generation %}` tag (marks assistant text for training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser):
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Budget:
    """The limits of one render: a deadline, a size in characters for any one value, and a total of characters
    made by all its operations together."""

    def __init__(self, timeout: float, max_chars: int):
        self.deadline = time.monotonic() + timeout
        self.timeout, self.max_chars = timeout, max_chars
        self.made, self.max_made = 0, MADE_PER_OUTPUT * max_chars

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"The chat template took longer than {self.timeout:g} s to render.")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise ChatTemplateError(f"The chat template's output would exceed {self.max_chars} characters.")

    def value(self, value):
        """`value`, once measured: a string, list or mapping over the size limit is refused, and new text counts
        against the render's total."""
        self.size(_size(value, self.max_chars))
        if isinstance(value, str):
            self.made += len(value)
            if self.made > self.max_made:
                raise ChatTemplateError(f"The chat template would exceed {self.max_made} characters in all.")
        return value

    def items(self, iterator) -> list:
        """A lazy sequence (map, select, ...) as a list, so it can be measured: no more items than the size limit."""
        items = list(itertools.islice(iterator, self.max_chars + 1))
        self.size(len(items))
        return items


def _size(value, limit: int) -> int:
    """About how many characters `value` becomes as text, counting a list of the same string n times n times;
    stops counting past `limit`, so measuring costs at most `limit` steps and little memory."""
    total, todo = 0, [value]
    while todo and total <= limit:
        item = todo.pop()
        if isinstance(item, dict):
            total += 2 * len(item) + 2
            members = itertools.chain.from_iterable(item.items())
        elif isinstance(item, list | tuple | set | frozenset):
            total += len(item) + 2
            members = item
        else:
            members = (item,)
        for member in members:
            if isinstance(member, str | bytes):
                total += len(member)
            elif isinstance(member, dict | list | tuple | set | frozenset):
                todo.append(member)
            else:  # a number, None, a loop or namespace object: a short text
                total += 8
            if total > limit:
                break
    return total


def _estimated(estimate, *args, **kwargs) -> int:
    try:
        return estimate(*args, **kwargs)
    except (TypeError, ValueError, AttributeError):  # arguments the operation itself will refuse
        return 0


def _int(value) -> int:
    return value if isinstance(value, int) else 0


def _text_len(value) -> int:
    return len(value) if isinstance(value, str) else 0


# Format strings: the widths and precisions in their fields ('%99999999s', '{:>99999999}'), and how many fields.
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*?:[^{}\d]*(\d+)?(?:[,_])?(?:\.(\d+))?[^{}]*\}")


def _formatted(template, fields: re.Pattern, arguments) -> int:
    """The most characters `template` filled with `arguments` can become: each field at most its width or
    precision, or all the arguments' text."""
    if not isinstance(template, str):
        return 0
    widest = 0
    for width, precision in fields.findall(template):
        for number in (width, precision):
            if number.isdigit():
                widest = max(widest, int(number) if len(number) < 12 else 10**12)
    each = max(widest, _size(arguments, 10**12)) + max(map(_int, _flat(arguments)), default=0)  # '%*s' widths
    return len(template) + (template.count("%") + template.count("{")) * each


def _flat(arguments):
    if isinstance(arguments, dict):
        return list(arguments.values())
    return list(arguments) if isinstance(arguments, list | tuple) else [arguments]


def _replaced(s, old, new, count=None) -> int:
    if not isinstance(s, str) or not isinstance(old, str):
        return 0
    times = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(s) + times * _text_len(new)


def _joined(items, separator="") -> int:
    return sum(_size(item, 10**12) for item in items) + len(items) * _text_len(separator)


def _wrapped(s, width=79, break_long_words=True, wrapstring=None, break_on_hyphens=True) -> int:
    n = _text_len(s)
    return n + (n // max(_int(width), 1) + (s.count("\n") if isinstance(s, str) else 0) + 1) * len(wrapstring or "\n")


def _indented(s, width=4, first=False, blank=False) -> int:
    lines = (s.count("\n") if isinstance(s, str) else 0) + 1
    return _text_len(s) + lines * (width if isinstance(width, int) else _text_len(width))


# What a filter or str method may build, estimated from its arguments before it runs. The rest build at most a
# few times their input, which is bounded already, and are measured after.
_FILTER_ESTIMATES = {
    "center": lambda value, width=80: max(_size(value, 10**12), _int(width)),
    "indent": _indented,
    "wordwrap": _wrapped,
    "truncate": lambda s, length=255, killwords=False, end="...", leeway=None: (
        min(_size(s, 10**12), _int(length)) + _text_len(end)
    ),
    "replace": _replaced,
    "join": lambda value, d="", attribute=None: _joined(value, d),
    "format": lambda value, *args, **kwargs: _formatted(value, _PERCENT_FIELD, kwargs or args),
    "tojson": lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        _size(value, 10**12) * (6 + (indent if isinstance(indent, int) else _text_len(indent)))  # \uXXXX, indents
    ),
}
_METHOD_ESTIMATES = {
    "ljust": lambda s, width, fill=" ": max(len(s), _int(width)),
    "rjust": lambda s, width, fill=" ": max(len(s), _int(width)),
    "center": lambda s, width, fill=" ": max(len(s), _int(width)),
    "zfill": lambda s, width: max(len(s), _int(width)),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * _int(tabsize),
    "replace": _replaced,
    "join": lambda s, items: _joined(items, s),
    "format": lambda s, *args, **kwargs: _formatted(s, _BRACE_SPEC, [*args, *kwargs.values()]),
    "format_map": lambda s, mapping: _formatted(s, _BRACE_SPEC, mapping),
    "translate": lambda s, table: len(s) * (1 + _size(table, 10**12)),
    "encode": lambda s, *args, **kwargs: 4 * len(s),
}
# Filters that turn a whole structure into text: their input is measured as text before they run.
_FLATTENING = {"string", "tojson", "pprint", "join", "format", "urlencode", "xmlattr", "escape", "e",
               "forceescape", "safe", "striptags", "list", "wordcount"}  # fmt: skip


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                         extensions=[_Generation, jinja2.ext.loopcontrols], finalize=self._output)  # fmt: skip
        self.budget: _Budget | None = None  # set for the duration of one render (one thread renders at a time)
        self.globals.pop("lipsum", None)  # lipsum(n=10**6) writes 10**6 paragraphs; no chat template uses it
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    def _output(self, value):
        """Each `{{ }}` value, before Jinja makes it text (a list printed as text is as long as its items)."""
        self.budget.check()
        if not isinstance(value, str):
            self.budget.size(_size(value, self.budget.max_chars))
        return self.budget.value(value)

    def concat(self, parts) -> str:
        """How Jinja joins the output of a macro or a block (Environment.concat is "".join): one text, measured."""
        text = "".join(parts)
        if self.budget is not None:
            self.budget.size(len(text))
        return text

    def tilde(self, *values) -> str:
        """`a ~ b ~ c` (see _Bounded): measured before the text is built."""
        self.budget.size(sum(_size(v, self.budget.max_chars) for v in values))
        return self.budget.value("".join(map(str, values)))

    def _bounded_filter(self, name: str, f):
        estimate = _FILTER_ESTIMATES.get(name)
        skip = 1 if getattr(f, "jinja_pass_arg", None) else 0  # its environment or context comes first

        @functools.wraps(f)  # keeps jinja_pass_arg
        def bounded(*args, **kwargs):
            budget = self.budget
            budget.check()
            head, args = args[:skip], list(args[skip:])
            if args and hasattr(args[0], "__next__"):  # map(), select(), ...: lazy, so measured as a list
                args[0] = budget.items(args[0])
            if name in _FLATTENING and args:
                budget.size(_size(args[0], budget.max_chars))
            if estimate is not None:
                budget.size(_estimated(estimate, *args, **kwargs))
            return budget.value(f(*head, *args, **kwargs))

        return bounded

    def call_binop(self, context, operator, left, right):
        budget = self.budget
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and abs(left).bit_length() * right > 4096:
                raise ChatTemplateError("The chat template computes a number too large to render.")
        elif operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, str | list | tuple) and isinstance(count, int):
                budget.size(_size(sized, budget.max_chars) * count)
            elif (
                isinstance(sized, int)
                and isinstance(count, int)
                and sized.bit_length() + count.bit_length() > MAX_INT_BITS
            ):
                raise ChatTemplateError("The chat template computes a number too large to render.")
        elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            budget.size(_size(left, budget.max_chars) + _size(right, budget.max_chars))
        elif operator == "%" and isinstance(left, str):
            budget.size(_formatted(left, _PERCENT_FIELD, right))
        return budget.value(super().call_binop(context, operator, left, right))

    def unsafe_undefined(self, obj, attribute):
        # Jinja's default renders a forbidden attribute as an empty value; say so instead.
        raise ChatTemplateError(f"The chat template tried to read {attribute!r}, which the sandbox forbids.")

    def call(self, context, obj, *args, **kwargs):
        budget = self.budget
        budget.check()
        owner = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)  # the sandbox wraps str.format
        estimate = _METHOD_ESTIMATES.get(getattr(obj, "__name__", "")) if isinstance(owner, str) else None
        if estimate is not None:
            if obj.__name__ == "join" and args and not isinstance(args[0], list | tuple | str):
                args = (budget.items(iter(args[0])), *args[1:])
            budget.size(_estimated(estimate, owner, *args, **kwargs))
        return budget.value(super().call(context, obj, *args, **kwargs))

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


class _Bounded(NodeTransformer):
    """Rewrites a template's tree: every `for` iterates through bounded_iter, every `a ~ b` is Sandbox.tilde."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name("__minerva_iter", "load"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return nodes.Call(nodes.Name("__minerva_concat", "load"), node.nodes, [], None, None)


@jinja2.pass_environment
def _tojson(environment, value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Transformers' tojson: unicode kept, indent allowed (Jinja's own escapes HTML and has no ensure_ascii).
    # Written piece by piece, so a structure that repeats one big string stops at the size limit.
    budget, parts, size = environment.budget, [], 0
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    for part in encoder.iterencode(value):
        size += len(part)
        budget.size(size)
        parts.append(part)
    return "".join(parts)


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
        self._environment.filters["tojson"] = self._environment._bounded_filter("tojson", _tojson)
        self._environment.globals.update(range=self._environment.bounded_range, raise_exception=_raise_exception,
                                         strftime_now=lambda fmt: datetime.now().strftime(fmt))  # fmt: skip
        try:
            tree = self._environment.parse(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"The chat template does not compile: {exc}") from None
        tree = _Bounded().visit(tree)
        self._environment.globals["__minerva_iter"] = self._environment.bounded_iter
        self._environment.globals["__minerva_concat"] = self._environment.tilde
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
