"""Chat templates are untrusted code: they render in a sandbox with a time and size limit (engine/template.py)."""

import tracemalloc

import pytest

from inference.engine.template import ChatTemplate, ChatTemplateError
from models_app.bundled import default_model_path
from models_app.metadata import read_metadata

HI = [{"role": "user", "content": "Hi"}]


def render(source: str, messages=HI, **variables) -> str:
    return ChatTemplate(source, timeout=1.0, max_chars=100_000).render(messages, **variables)


def test_the_default_models_template_renders_chatml_with_the_generation_prompt():
    source = read_metadata(default_model_path()).chat_template
    prompt = render(source)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_templates_get_tojson_without_ascii_escapes_raise_exception_and_strftime_now():
    assert (
        render("{{ messages[0] | tojson }}", [{"role": "user", "content": "é"}]) == '{"role": "user", "content": "é"}'
    )
    assert len(render("{{ strftime_now('%Y') }}")) == 4
    with pytest.raises(ChatTemplateError, match="refused the messages: only user"):
        render("{{ raise_exception('only user') }}")


def test_a_macros_output_is_its_text():
    # Jinja joins a macro's output with Environment.concat; a sandbox method of that name once made it a list's
    # repr (Qwen3.5's tool results rendered as "['sunny']", gpt-oss's whole system prompt likewise).
    source = "{% macro shout(t) %}{{ t | upper }}!{% endmacro %}{{ shout(messages[0].content) | trim }}-{{ 'a' ~ 'b' }}"
    assert render(source) == "HI!-ab"


def test_hugging_faces_generation_tag_renders_its_body():
    assert render("{% generation %}body{% endgeneration %}") == "body"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.__class__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{% set x = messages.append(1) %}",  # the sandbox is immutable: no mutating the request
    ],
    ids=["__class__", "__globals__", "dunder attribute", "lipsum globals", "mutation"],
)
def test_the_sandbox_refuses_attribute_tricks(source):
    with pytest.raises(ChatTemplateError):
        render(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'a' * 10**9 }}",
        "{{ 'a' * 100000 * 100000 }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{{ [1] * 10**9 }}",
        "{{ 2 ** 100000000 }}",
        "{% for i in range(99999) %}{{ 'xxxxxxxxxx' }}{% endfor %}",
    ],
    ids=["string repeat", "chained repeat", "doubling", "list repeat", "huge power", "big output"],
)
def test_templates_cannot_build_huge_values(source):
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match=r"exceed|too large"):
            render(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000


@pytest.mark.parametrize(
    "source",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for c in 'x' * 90000 %}{% for d in 'y' * 90000 %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ],
    ids=["nested ranges", "nested strings", "recursion"],
)
def test_runaway_templates_stop_at_the_deadline_with_a_typed_error(source):
    with pytest.raises(ChatTemplateError, match=r"longer than|failed|in all"):
        render(source)


def test_a_range_beyond_the_sandbox_limit_is_refused():
    with pytest.raises(ChatTemplateError, match="range"):
        render("{% for i in range(10**9) %}{% endfor %}")


def test_a_template_that_does_not_compile_is_a_typed_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_a_template_keeps_working_after_a_refused_render():
    template = ChatTemplate("{% if messages[0].content == 'boom' %}{{ 'a' * 10**9 }}{% endif %}ok", max_chars=1000)
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "boom"}])
    assert template.render(HI) == "ok"


BIG = "{% set s = 'x' * 1000000 %}"  # a legal value: a million characters
HUNDRED = "[" + "s, " * 100 + "]"  # a list of a hundred of them: cheap, as it holds one string
# Each builds about 100 million characters from a template of a few hundred bytes, with one operation.
BUILDERS = {
    "~": BIG + "{{ s" + " ~ s" * 99 + " }}",
    "+": BIG + "{{ s" + " + s" * 99 + " }}",
    "*": "{{ 'x' * 100000000 }}",
    "* of a list": BIG + "{{ [s] * 100 }}",
    "%": "{{ '%100000000s' % 'x' }}",
    "% with * width": "{{ '%*s' % (100000000, 'x') }}",
    "|center": "{{ 'x' | center(100000000) }}",
    "|indent": "{{ ('\\n' * 1000000) | indent(100) }}",
    "|format": "{{ '%100000000s' | format('x') }}",
    "|join": BIG + "{{ " + HUNDRED + " | join }}",
    "|replace": "{{ ('x' * 10000) | replace('x', 'y' * 10000) }}",
    "|wordwrap": "{{ ('x' * 1000000) | wordwrap(1, wrapstring='y' * 100) }}",
    "|list": BIG + "{{ (s ~ s ~ s ~ s) | list }}",
    "|string": BIG + "{{ " + HUNDRED + " | string }}",
    "|pprint": BIG + "{{ " + HUNDRED + " | pprint }}",
    "|tojson": BIG + "{{ " + HUNDRED + " | tojson }}",
    "|tojson indent": "{{ [[[[[[[1]]]]]]] | tojson(indent=10000000) }}",
    "|escape": "{{ ('<' * 3999999) | e }}",
    "|map |join": BIG + "{{ range(100) | map('replace', '', s) | join }}",
    "str.format": "{{ '{:>100000000}'.format('x') }}",
    "str.format of one value many times": BIG + "{{ '" + "{0}" * 100 + "'.format(s) }}",
    "str.format_map": BIG + "{{ '" + "{a}" * 100 + "'.format_map({'a': s}) }}",
    "str.join": BIG + "{{ ''.join(" + HUNDRED + ") }}",
    "str.ljust": "{{ 'x'.ljust(100000000) }}",
    "str.rjust": "{{ 'x'.rjust(100000000) }}",
    "str.center": "{{ 'x'.center(100000000) }}",
    "str.zfill": "{{ '1'.zfill(100000000) }}",
    "str.expandtabs": "{{ ('\\t' * 1000000).expandtabs(100) }}",
    "str.replace": "{{ ('x' * 10000).replace('x', 'y' * 10000) }}",
    "str.translate": "{{ ('x' * 10000).translate({120: 'y' * 10000}) }}",
    "output of a list": BIG + "{{ " + HUNDRED + " }}",
    "range": "{{ range(100000000) | list }}",
    "int *": "{% set ns = namespace(n=2 ** 4000) %}{% for i in range(20) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "macro output": "{% macro f() %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endmacro %}{{ f() }}",
}


@pytest.mark.parametrize("source", list(BUILDERS.values()), ids=list(BUILDERS))
def test_no_operation_builds_a_hundred_million_characters_from_a_small_template(source):
    tracemalloc.start()  # from compiling on: Jinja computes constant expressions when it compiles
    try:
        with pytest.raises(ChatTemplateError, match=r"exceed|too large|range") as refused:
            ChatTemplate(source).render(HI)  # the real limits: 4 million characters, 2 seconds
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "longer than" not in str(refused.value)  # refused for its size, not stopped at the deadline
    assert peak < 64_000_000


def test_bounded_operations_still_render_what_chat_templates_do():
    source = (
        "{% for m in messages %}{{ ('<|' ~ m.role ~ '|>\\n' + m.content | trim) | indent(2) | replace('Hi', 'Hello') }}"
        "{{ '%s:%d' % (m.role, loop.index) }}{{ '{}-{}'.format(m.role, 1) | center(12) }}{% endfor %}"
        "{{ messages | map(attribute='content') | join(', ') }}{{ messages | tojson(indent=2) | length > 0 }}"
        "{{ 'x'.ljust(3, '.') }}{{ ('a\\tb').expandtabs(2) }}{{ 'abc' | truncate(2, end='') }}"
        "{{ 'abc' | truncate(100000000) }}{{ 'ab' | center(3) }}{{ '%5s' % 'ab' }}"
    )
    assert render(source) == "<|user|>\n  Hellouser:1   user-1   HiTruex..a babcabc ab   ab"
