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
    with pytest.raises(ChatTemplateError, match=r"longer than|failed"):
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
