"""Today's tool-call formats, each with its family's real chat template (tests/templates/llama.cpp, from the pinned
llama-cpp-python sdist): the template renders a tool conversation through the sandboxed renderer, the family's call
text parses to OpenAI's calls, streamed pieces fold to the same calls, and the grammar for a required call, checked
by llama.cpp itself against SmolLM2's vocabulary, accepts the call text and refuses words."""

import ctypes
import json
import math
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import pytest
from llama_cpp import _internals

from api.protocol import ChatCompletionRequest
from core.generation import GenerationRequest
from inference.engine.template import ChatTemplate, ChatTemplateError
from inference.reasoning import reasoning_splitter
from inference.run import _prompt
from inference.serving import Generation
from inference.tool_calls import ToolCallPart, ToolCallStream, calls_fold, parse_tool_calls
from inference.tools import TOOL_FORMATS, json_schema_grammar, tool_format_for, tool_grammar
from models_app.bundled import default_model_path
from models_app.models import LanguageModel

TEMPLATES = Path(__file__).parent.parent / "templates" / "llama.cpp"

WRITE = {"name": "write", "description": "Write a file", "parameters": {"type": "object", "properties": {
    "path": {"type": "string"}, "text": {"type": "string"}, "mode": {"type": "integer"}, "opts": {"type": "object"},
    "flag": {"type": "boolean"}}, "required": ["path", "text"]}}  # fmt: skip
LS = {"name": "ls", "description": "List files", "parameters": {"type": "object", "properties": {}}}
WRITE_ARGS = {"path": "src/a.py", "text": 'print("hi")\nx = {"k": [1]}\n', "mode": 2,
              "opts": {"deep": {"list": [1, "}"]}}, "flag": True}  # fmt: skip
ARGS = json.dumps(WRITE_ARGS)
CONVERSATION = [
    {"role": "system", "content": "You write code."},
    {"role": "user", "content": "Write src/a.py, then list the files."},
    {"role": "assistant", "content": "", "reasoning": "I will write the file.", "tool_calls": [
        {"id": "call_1", "name": "write", "arguments": ARGS}, {"id": "call_2", "name": "ls", "arguments": "{}"}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "written"},
    {"role": "tool", "tool_call_id": "call_2", "content": "src/a.py"},
]  # fmt: skip

# The families' own text for write(WRITE_ARGS) alone, and for write then ls(), as their templates write calls.
QWEN_WRITE = ('<tool_call>\n<function=write>\n<parameter=path>\nsrc/a.py\n</parameter>\n<parameter=text>\n'
              'print("hi")\nx = {"k": [1]}\n\n</parameter>\n<parameter=mode>\n2\n</parameter>\n<parameter=opts>\n'
              '{"deep": {"list": [1, "}"]}}\n</parameter>\n<parameter=flag>\ntrue\n</parameter>\n</function>\n'
              "</tool_call>")  # fmt: skip
QWEN = QWEN_WRITE + "\n<tool_call>\n<function=ls>\n</function>\n</tool_call>"
GLM_WRITE = ('<tool_call>write\n<arg_key>path</arg_key>\n<arg_value>src/a.py</arg_value>\n<arg_key>text</arg_key>\n'
             '<arg_value>print("hi")\nx = {"k": [1]}\n</arg_value>\n<arg_key>mode</arg_key>\n<arg_value>2</arg_value>'
             '\n<arg_key>opts</arg_key>\n<arg_value>{"deep": {"list": [1, "}"]}}</arg_value>\n<arg_key>flag</arg_key>\n'
             "<arg_value>true</arg_value>\n</tool_call>")  # fmt: skip
GLM = GLM_WRITE + "\n<tool_call>ls\n</tool_call>"
# GLM-4.7 writes no newlines between its tags (a value keeps its own).
GLM47_WRITE = ('<tool_call>write<arg_key>path</arg_key><arg_value>src/a.py</arg_value><arg_key>text</arg_key>'
               '<arg_value>print("hi")\nx = {"k": [1]}\n</arg_value><arg_key>mode</arg_key><arg_value>2</arg_value>'
               '<arg_key>opts</arg_key><arg_value>{"deep": {"list": [1, "}"]}}</arg_value><arg_key>flag</arg_key>'
               "<arg_value>true</arg_value></tool_call>")  # fmt: skip
GLM47 = GLM47_WRITE + "<tool_call>ls</tool_call>"
MINIMAX_WRITE_CALL = ('<invoke name="write">\n<parameter name="path">src/a.py</parameter>\n<parameter name="text">'
                      'print("hi")\nx = {"k": [1]}\n</parameter>\n<parameter name="mode">2</parameter>\n<parameter '
                      'name="opts">{"deep": {"list": [1, "}"]}}</parameter>\n<parameter name="flag">true</parameter>\n'
                      "</invoke>\n")  # fmt: skip
MINIMAX_WRITE = f"<minimax:tool_call>\n{MINIMAX_WRITE_CALL}</minimax:tool_call>"
MINIMAX = f'<minimax:tool_call>\n{MINIMAX_WRITE_CALL}<invoke name="ls">\n</invoke>\n</minimax:tool_call>'
DSML_WRITE_CALL = ('<｜DSML｜invoke name="write">\n<｜DSML｜parameter name="path" string="true">src/a.py'
                   '</｜DSML｜parameter>\n<｜DSML｜parameter name="text" string="true">print("hi")\nx = {"k": [1]}\n'
                   '</｜DSML｜parameter>\n<｜DSML｜parameter name="mode" string="false">2</｜DSML｜parameter>\n'
                   '<｜DSML｜parameter name="opts" string="false">{"deep": {"list": [1, "}"]}}</｜DSML｜parameter>\n'
                   '<｜DSML｜parameter name="flag" string="false">true</｜DSML｜parameter>\n'
                   "</｜DSML｜invoke>\n")  # fmt: skip
DSML_LS_CALL = '<｜DSML｜invoke name="ls">\n</｜DSML｜invoke>\n'
DSML_WRITE = f"<｜DSML｜function_calls>\n{DSML_WRITE_CALL}</｜DSML｜function_calls>"
DSML = f"<｜DSML｜function_calls>\n{DSML_WRITE_CALL}{DSML_LS_CALL}</｜DSML｜function_calls>"
DEEPSEEK_LS = "<｜tool▁call▁begin｜>ls<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
DEEPSEEK_WRITE = (f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>write<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>"
                  "<｜tool▁calls▁end｜>")  # fmt: skip
DEEPSEEK = DEEPSEEK_WRITE.replace("<｜tool▁calls▁end｜>", DEEPSEEK_LS + "<｜tool▁calls▁end｜>")
KIMI_WRITE = (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.write:0<|tool_call_argument_begin|>{ARGS}"
              "<|tool_call_end|><|tool_calls_section_end|>")  # fmt: skip
KIMI = KIMI_WRITE.replace("<|tool_calls_section_end|>", "<|tool_call_begin|>functions.ls:1<|tool_call_argument_begin|>"
                          "{}<|tool_call_end|><|tool_calls_section_end|>")  # fmt: skip
# Harmony has no parallel calls (<|call|>, an end-of-generation token, ends the turn): a thought, then one call.
HARMONY = ("<|channel|>analysis<|message|>I will write the file.<|end|><|start|>assistant<|channel|>commentary "
           f"to=functions.write <|constrain|>json<|message|>{ARGS}")  # fmt: skip
HERMES_WRITE = f'<tool_call>\n{{"name": "write", "arguments": {ARGS}}}\n</tool_call>'
HERMES = HERMES_WRITE + '\n<tool_call>\n{"name": "ls", "arguments": {}}\n</tool_call>'
LLAMA3 = f'{{"name": "write", "parameters": {ARGS}}}'  # one call a turn
MISTRAL_WRITE = f"[TOOL_CALLS]write[ARGS]{ARGS}"
MISTRAL = MISTRAL_WRITE + "[TOOL_CALLS]ls[ARGS]{}"


@dataclass
class Family:
    template: str
    tool_format: str
    one: str  # the family's text of the write call alone, as the model writes it
    calls: str  # of the write call, then the ls call
    rendered: tuple[str, ...]  # what the template must write for the conversation's earlier calls and results


FAMILIES = {
    "Qwen3-Coder": Family("Qwen3-Coder", "qwen3_coder", QWEN_WRITE, QWEN, (
        "<tool_call>\n<function=write>\n<parameter=path>\nsrc/a.py\n</parameter>\n<parameter=text>\nprint(\"hi\")",
        '<parameter=opts>\n{"deep": {"list": [1, "}"]}}\n</parameter>', "<function=ls>\n</function>",
        "<tool_response>\nwritten\n</tool_response>", "<name>write</name>")),
    "Qwen3.5": Family("Qwen3.5-4B", "qwen3_coder", QWEN_WRITE, QWEN, (
        "<think>\nI will write the file.\n</think>\n\n<tool_call>\n<function=write>\n<parameter=path>\nsrc/a.py",
        "<tool_response>\nwritten\n</tool_response>", '"name": "write"', "You write code.<|im_end|>")),
    "gpt-oss": Family("openai-gpt-oss-120b", "harmony", HARMONY, HARMONY, (
        "<|start|>assistant<|channel|>analysis<|message|>I will write the file.<|end|>",
        f"<|start|>assistant to=functions.write<|channel|>commentary json<|message|>{ARGS}<|call|>"
        '<|start|>functions.write to=assistant<|channel|>commentary<|message|>"written"<|end|>'
        "<|start|>assistant to=functions.ls<|channel|>commentary json<|message|>{}<|call|>"
        '<|start|>functions.ls to=assistant<|channel|>commentary<|message|>"src/a.py"<|end|>',
        "type write = (_: {\npath: string,", "# Instructions\n\nYou write code.")),
    "DeepSeek V3.1": Family("deepseek-ai-DeepSeek-V3.1", "deepseek_v3_1", DEEPSEEK_WRITE, DEEPSEEK, (
        DEEPSEEK + "<｜end▁of▁sentence｜><｜tool▁output▁begin｜>written<｜tool▁output▁end｜>",
        "### write\nDescription: Write a file",  # its template leaves the tools to the system prompt
        "You write code.")),
    "DeepSeek V3.2": Family("deepseek-ai-DeepSeek-V3.2", "deepseek_v3_2", DSML_WRITE, DSML, (
        DSML, "<result>written</result>", '{"name": "write"')),
    "DeepSeek V4": Family("deepseek-ai-DeepSeek-V4", "deepseek_v4", DSML_WRITE.replace("function_calls", "tool_calls"),
                          DSML.replace("function_calls", "tool_calls"), (
        DSML_WRITE_CALL, '<｜DSML｜invoke name="ls">\n\n</｜DSML｜invoke>',  # V4 writes an empty line for no arguments
        "<tool_result>written</tool_result>", '{"name": "write"')),
    "GLM-4.6": Family("GLM-4.6", "glm", GLM_WRITE, GLM, (
        "<think>I will write the file.</think>\n" + GLM, "<tool_response>\nwritten\n</tool_response>")),
    "GLM-4.7": Family("GLM-4.7-Flash", "glm", GLM47_WRITE, GLM47, (
        "<think>I will write the file.</think>" + GLM47, "<tool_response>written</tool_response>")),
    "Kimi K2": Family("moonshotai-Kimi-K2", "kimi_k2", KIMI_WRITE, KIMI, (KIMI, "## Return of functions.write:0")),
    "MiniMax M2": Family("MiniMax-M2", "minimax_m2", MINIMAX_WRITE, MINIMAX, (
        "<think>\nI will write the file.\n</think>", MINIMAX, "<response>written</response>")),
    "Qwen2.5": Family("Qwen-Qwen2.5-7B-Instruct", "hermes", HERMES_WRITE, HERMES, (
        HERMES + "<|im_end|>", "<tool_response>\nwritten\n</tool_response>", '{"type": "function", "function": {')),
    "Llama 3.1": Family("meta-llama-Llama-3.1-8B-Instruct", "llama3", LLAMA3, LLAMA3, (
        # one turn per call (its template refuses more), each followed by its result
        LLAMA3 + '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"written"<|eot_id|>',
        '{"name": "ls", "parameters": {}}<|eot_id|><|start_header_id|>ipython', '"name": "write"')),
    "Devstral": Family("unsloth-mistral-Devstral-Small-2507", "mistral", MISTRAL_WRITE, MISTRAL, (
        MISTRAL + "</s>[TOOL_RESULTS]written[/TOOL_RESULTS]",)),
}  # fmt: skip
IDS = list(FAMILIES)


def source(family: Family) -> str:
    return (TEMPLATES / f"{family.template}.jinja").read_text()


def request(**extra) -> GenerationRequest:
    return GenerationRequest(model="m", messages=CONVERSATION, tools=[WRITE, LS], **extra)


class Engine:
    """What _prompt needs of a loaded model: its template; the prompt stays text."""

    def __init__(self, template: str):
        self.chat_template = ChatTemplate(template, bos_token="<s>", eos_token="</s>")

    def chat_prompt(self, messages: list[dict], **variables) -> str:
        return self.chat_template.render(messages, **variables)


def lead(family: Family) -> str:
    """Words before the calls, as the family writes them (gpt-oss: a preamble on the commentary channel; Llama 3:
    none, its answer is a call only if it starts with one)."""
    if family.tool_format == "harmony":
        return "<|channel|>commentary<|message|>Let me do it.<|end|><|start|>assistant"
    return "" if family.tool_format == "llama3" else "Let me do it.\n"


def answer(family: Family, pieces: list[str]) -> tuple[str, str, list[ToolCallPart]]:
    """(reasoning, content, call parts) of an answer fed in `pieces`, as the view reads it (inference/serving.py)."""
    syntax = "harmony" if family.tool_format == "harmony" else "think"
    splitter = reasoning_splitter(syntax, family.tool_format, thinking=False, calls=True)
    stream = ToolCallStream(family.tool_format, request().offered_tools())
    reasoning, items = [], []
    for piece in [*pieces, None]:
        thought, text = splitter.feed(piece) if piece is not None else splitter.flush()
        reasoning.append(thought)
        items += stream.feed(text) + (stream.finish() if piece is None else [])
    content = "".join(item for item in items if isinstance(item, str)).strip()
    return "".join(reasoning), content, [item for item in items if isinstance(item, ToolCallPart)]


def expected_calls(family: Family) -> list[tuple[str, dict]]:
    return [("write", WRITE_ARGS)] if family.one == family.calls else [("write", WRITE_ARGS), ("ls", {})]


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_the_format_is_picked_from_the_familys_template(family):
    assert tool_format_for(source(family)) == family.tool_format


def test_the_admin_offers_every_tool_format():
    choices = [value for value, _ in LanguageModel._meta.get_field("tool_format").choices]
    assert choices == list(TOOL_FORMATS)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_the_template_renders_a_tool_conversation_in_its_familys_form(family):
    body = request()
    prompt = _prompt(Engine(source(family)), body, family.tool_format, family.tool_format)
    for part in family.rendered:
        assert part in prompt
    assert "You can call these tools" not in prompt  # the generic format's words are for templates without tools


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_the_familys_call_text_parses_to_openai_tool_calls(family):
    reasoning, content, parts = answer(family, [lead(family), family.calls])
    calls = calls_fold(parts)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == expected_calls(family)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    assert content == ("Let me do it." if lead(family) else "")
    assert reasoning == ("I will write the file." if family.tool_format == "harmony" else "")  # its analysis channel


def chunks(text: str, sizes: tuple[int, ...]) -> list[str]:
    out, i, k = [], 0, 0
    while i < len(text):
        out.append(text[i : i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    return out


@pytest.mark.parametrize("sizes", [(1,), (3, 7, 2, 11, 5)], ids=["a character at a time", "odd chunks"])
@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_streamed_pieces_concatenate_to_the_same_calls(family, sizes):
    text = lead(family) + family.calls
    whole = answer(family, [text])
    reasoning, content, parts = answer(family, chunks(text, sizes))
    assert (reasoning, content) == whole[:2]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls_fold(parts)] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in calls_fold(whole[2])
    ]
    heads = [p for p in parts if p.id is not None]
    assert len(heads) == len(expected_calls(family))
    if sizes == (1,):  # the arguments stream as they are written, not at the call's end
        first = [p for p in parts if p.index == 0 and p.arguments]
        assert len(first) > 5


@pytest.fixture(scope="module")
def vocab():
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = _internals.LlamaModel(path_model=str(default_model_path()), params=params, verbose=False)
    yield model
    model.close()


def grammar_walk(vocab, grammar: str, triggers: list[str], text: str) -> str:
    """Feed `text` (SmolLM2's tokens of it) through llama.cpp's grammar sampler as the engine samples: each token
    is checked alone before it is accepted (accepting a token the grammar refused aborts the process). "accepted"
    when every token passed and the grammar may end there, "refused" at the first token it refuses, "unfinished"
    when it wants more."""
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*[t.encode() for t in triggers])
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            vocab.vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0
        )
    else:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab.vocab, grammar.encode(), b"root")
    assert sampler, "llama.cpp refused the grammar"
    try:
        for token in [*vocab.tokenize(text.encode(), add_bos=False, special=False), None]:
            if token is None:  # the end: may the answer stop here?
                token = llama_cpp.llama_vocab_eos(vocab.vocab)
                return "accepted" if allowed(sampler, token) else "unfinished"
            if not allowed(sampler, token):
                return "refused"
            llama_cpp.llama_sampler_accept(sampler, token)
    finally:
        llama_cpp.llama_sampler_free(sampler)


def allowed(sampler, token: int) -> bool:
    data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    array = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return math.isfinite(data[0].logit)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_a_required_call_grammar_accepts_the_call_text_and_refuses_words(family, vocab):
    grammar, triggers = tool_grammar(request(tool_choice="required"), family.tool_format)
    assert triggers == []
    assert grammar_walk(vocab, grammar, [], family.calls) == "accepted"
    assert grammar_walk(vocab, grammar, [], "Sure, I will write the file.") == "refused"
    assert grammar_walk(vocab, grammar, [], family.calls[: len(family.calls) // 2]) == "unfinished"


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_a_named_choice_grammar_holds_the_model_to_that_function(family, vocab):
    grammar, _ = tool_grammar(request(tool_choice="named", tool_name="write"), family.tool_format)
    assert grammar_walk(vocab, grammar, [], family.one) == "accepted"
    grammar, _ = tool_grammar(request(tool_choice="named", tool_name="ls"), family.tool_format)
    assert grammar_walk(vocab, grammar, [], family.one) == "refused"


def test_parallel_tool_calls_false_allows_one_call(vocab):
    for family in FAMILIES.values():
        grammar, _ = tool_grammar(request(tool_choice="required", parallel_tool_calls=False), family.tool_format)
        assert grammar_walk(vocab, grammar, [], family.one) == "accepted", family.template
        if family.calls != family.one:
            assert grammar_walk(vocab, grammar, [], family.calls) == "refused", family.template


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_an_auto_grammar_lets_words_through_and_holds_the_call_once_it_starts(family, vocab):
    grammar, triggers = tool_grammar(request(tool_choice="auto"), family.tool_format)
    assert triggers
    assert grammar_walk(vocab, grammar, triggers, "Let me write it. Then I'll list the files.") == "accepted"
    words = "Let me write it. Then I'll list the files.\n\n" if lead(family) else ""  # Llama 3: a call or words
    assert grammar_walk(vocab, grammar, triggers, words + family.calls) == "accepted"
    cut = family.calls.rindex("write") + len("write")  # the call started: a wrong turn is refused
    assert grammar_walk(vocab, grammar, triggers, words + family.calls[:cut] + "!!nonsense") == "refused"


def test_a_qwen3_coder_call_without_its_tool_call_tag_wakes_the_auto_grammar_which_holds_it(vocab):
    grammar, triggers = tool_grammar(request(tool_choice="auto"), "qwen3_coder")
    words = "Let me write it.\n"
    bare = QWEN.removeprefix("<tool_call>\n")  # the first block's <tool_call> left out, the second's kept
    assert grammar_walk(vocab, grammar, triggers, words + bare) == "accepted"
    cut = bare.index("<parameter=path>")  # the opener woke the grammar: a wrong turn is refused
    assert grammar_walk(vocab, grammar, triggers, words + bare[:cut] + "!!nonsense") == "refused"
    # A tool that was not offered is text (as the parser reads it), and so is C++'s <functional>.
    assert grammar_walk(vocab, grammar, triggers, words + "<function=rm>\n!!\n#include <functional>") == "accepted"


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


@pytest.mark.parametrize("family", FAMILIES.values(), ids=IDS)
def test_with_a_response_format_the_answer_is_a_call_or_json_that_follows_the_schema(family, vocab):
    grammar, triggers = tool_grammar(request(tool_choice="auto", json_schema=ANSWER_SCHEMA), family.tool_format)
    assert triggers == []  # held from the first token: words must follow the schema too
    final = '{"answer": "42"}'
    if family.tool_format == "harmony":
        final = "<|channel|>final<|message|>" + final
    assert grammar_walk(vocab, grammar, [], family.calls) == "accepted"
    assert grammar_walk(vocab, grammar, [], final) == "accepted"
    assert grammar_walk(vocab, grammar, [], final.replace('"answer"', '"reply"')) == "refused"
    assert grammar_walk(vocab, grammar, [], "The answer is 42.") == "refused"


def test_the_generic_formats_json_answer_streams_as_content_and_a_call_as_a_call(vocab):
    grammar, _ = tool_grammar(request(tool_choice="auto", json_schema=ANSWER_SCHEMA), "generic")
    answer_text = '{"response": {"answer": "4\\"2"}}'
    assert grammar_walk(vocab, grammar, [], answer_text) == "accepted"
    assert grammar_walk(vocab, grammar, [], '{"response": "42"}') == "refused"
    call_text = '{"tool_calls": [{"name": "ls", "arguments": {}}]}'
    assert grammar_walk(vocab, grammar, [], call_text) == "accepted"
    for size in (1, 3, len(answer_text)):
        stream = ToolCallStream("generic", request().offered_tools())
        items = [item for piece in chunks(answer_text, (size,)) for item in stream.feed(piece)] + stream.finish()
        assert items and all(isinstance(item, str) for item in items)
        assert json.loads("".join(items)) == {"answer": '4"2'}
    content, calls = parse_tool_calls("generic", call_text, request().offered_tools())
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("ls", {})]


def test_a_thinking_model_may_think_before_a_required_call(vocab):
    grammar, _ = tool_grammar(request(tool_choice="required"), "glm", think="open")
    assert grammar_walk(vocab, grammar, [], "The user wants a file.\n</think>\n\n" + GLM) == "accepted"
    assert grammar_walk(vocab, grammar, [], "The user wants a file." + GLM) == "unfinished"  # it must close first
    grammar, _ = tool_grammar(request(tool_choice="required"), "qwen3_coder", think="open")
    assert grammar_walk(vocab, grammar, [], "The user wants a file.\n</think>\n\n" + QWEN) == "accepted"
    assert grammar_walk(vocab, grammar, [], "The user wants a file.\n" + QWEN) == "accepted"  # Qwen3.5 may call
    grammar, _ = tool_grammar(request(tool_choice="required"), "glm", think="optional")
    assert grammar_walk(vocab, grammar, [], "\n<think>Plan.</think>\n" + GLM) == "accepted"
    assert grammar_walk(vocab, grammar, [], GLM) == "accepted"


def test_a_thought_that_ends_in_a_call_is_reasoning_then_a_call():
    splitter = reasoning_splitter("think", "qwen3_coder", thinking=True, calls=True)
    thought, text = splitter.feed("The user wants a file.\n" + QWEN[:40])
    assert thought == "The user wants a file.\n" and text.startswith("<tool_call>")


def test_without_tools_gpt_oss_channels_are_still_reasoning_and_answer():
    splitter = reasoning_splitter("harmony", None, thinking=False, calls=False)
    text = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>commentary to=functions.x "
            "<|constrain|>json<|message|>{}<|end|><|start|>assistant<|channel|>final<|message|>Hello!")  # fmt: skip
    pieces = [splitter.feed(ch) for ch in text] + [splitter.flush()]
    assert ("".join(p[0] for p in pieces), "".join(p[1] for p in pieces)) == ("Think.", "Hello!")


def test_a_model_that_writes_no_harmony_answers_in_plain_text():
    splitter = reasoning_splitter("harmony", None, thinking=False, calls=False)
    assert splitter.feed("Hello there.") == ("", "Hello there.") and splitter.flush() == ("", "")


def test_earlier_calls_keep_the_ids_their_family_writes():
    body = ChatCompletionRequest.model_validate({"model": "m", "tools": [{"type": "function", "function": WRITE}],
        "messages": [{"role": "user", "content": "Go"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "write", "arguments": ARGS}}]},
            {"role": "tool", "tool_call_id": "call_abc", "content": "ok"}]}).to_generation()  # fmt: skip
    nemo = _prompt(Engine((TEMPLATES / "mistralai-Mistral-Nemo-Instruct-2407.jinja").read_text()), body, "mistral",
                   "mistral")  # fmt: skip  # its template refuses any id but nine letters and digits
    (short,) = {part.split('"')[0] for part in nemo.split('"id": "')[1:]}
    assert len(short) == 9 and short.isalnum() and f'"call_id": "{short}"' in nemo


def test_a_template_that_needs_what_the_renderer_lacks_is_a_clear_refusal():
    # Kimi K2 Instruct's current template appends to a list, which the sandbox forbids: the render fails with a
    # message naming it (the worker's PromptError, a 400), never a wrong prompt. tests/api/test_tool_formats.py
    # has the request's side.
    with pytest.raises(ChatTemplateError, match="'append', which the sandbox forbids"):
        _prompt(Engine((TEMPLATES / "Kimi-K2-Instruct.jinja").read_text()), request(), "kimi_k2", "kimi_k2")


async def worker_events(start: dict, text: str, size: int):
    """What a worker publishes for `text` (in tokens of `size` characters) after a `start` event."""
    yield "start", start
    for i in range(0, len(text), size):
        yield "token", {"index": 0, "text": text[i : i + size]}
    yield "done", {"index": 0, "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1}


@pytest.mark.parametrize("size", [1, 4])
async def test_gpt_oss_channels_reach_the_view_as_reasoning_and_a_streamed_call(size):
    body = request(tool_choice="auto")
    start = {"tool_format": "harmony", "reasoning": "harmony", "thinking": False}  # as inference/run.py sends it
    generation = Generation("req", body, worker_events(start, HARMONY, size))
    deltas = [d async for d in generation.deltas()]
    assert "".join(d.reasoning for d in deltas) == "I will write the file."
    assert "".join(d.text for d in deltas) == ""
    parts = [p for d in deltas for p in d.tool_call_parts]
    assert parts[0].name == "write" and len([p for p in parts if p.arguments]) > 1
    (last,) = [d for d in deltas if d.finish_reason]
    assert last.finish_reason == "tool_calls" and json.loads(last.tool_calls[0]["function"]["arguments"]) == WRITE_ARGS
    answer = await Generation("req", body, worker_events(start, HARMONY, size)).collect()
    assert answer.choices[0].reasoning == "I will write the file." and answer.choices[0].text is None


async def test_without_the_harmony_start_the_view_splits_think_tags_as_before():
    body = GenerationRequest(model="m", messages=CONVERSATION)
    text = "<think>Plan.</think>Hello."
    answer = await Generation("req", body, worker_events({"thinking": False}, text, 3)).collect()
    assert (answer.choices[0].reasoning, answer.choices[0].text) == ("Plan.", "Hello.")


# What Pydantic writes for a tool whose argument is a nested model (openai.pydantic_function_tool, agent frameworks).
NESTED = {"name": "ship", "parameters": {
    "$defs": {"Addr": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    "type": "object", "properties": {"to": {"$ref": "#/$defs/Addr"},
                                     "back": {"anyOf": [{"$ref": "#/$defs/Addr"}, {"type": "null"}]}},
    "required": ["to"]}}  # fmt: skip


@pytest.mark.parametrize("tool_format", ["generic", "hermes", "qwen3_coder"])
def test_a_tools_local_refs_resolve_inside_the_grammars_wrapper_and_hold_the_call(vocab, tool_format):
    body = GenerationRequest(model="m", messages=CONVERSATION, tools=[NESTED], tool_choice="required")
    grammar, _ = tool_grammar(body, tool_format)  # "#/$defs/Addr" used to be looked up in the wrapper: a 400
    good, bad = {"to": {"city": "Oslo"}, "back": None}, {"to": {"town": "Oslo"}}
    texts = {
        "generic": lambda args: json.dumps({"tool_calls": [{"name": "ship", "arguments": args}]}),
        "hermes": lambda args: f"<tool_call>\n{json.dumps({'name': 'ship', 'arguments': args})}\n</tool_call>",
        "qwen3_coder": lambda args: "<tool_call>\n<function=ship>\n" + "".join(
            f"<parameter={k}>\n{json.dumps(v)}\n</parameter>\n" for k, v in args.items()) + "</function>\n</tool_call>",
    }  # fmt: skip
    assert grammar_walk(vocab, grammar, [], texts[tool_format](good)) == "accepted"
    assert grammar_walk(vocab, grammar, [], texts[tool_format](bad)) == "refused"


def test_a_recursive_ref_in_a_tool_is_refused_and_a_ref_used_many_times_is_bounded():
    from inference.tools import refs_inlined

    node = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/N"}}}}
    tree = {"$defs": {"N": node}, "$ref": "#/$defs/N"}
    with pytest.raises(ValueError, match="recursive"):
        refs_inlined(tree)
    defs = {"L0": {"type": "string"}} | {f"L{i}": {"type": "object", "properties": {
        "a": {"$ref": f"#/$defs/L{i - 1}"}, "b": {"$ref": f"#/$defs/L{i - 1}"}}} for i in range(1, 30)}  # fmt: skip
    with pytest.raises(ValueError, match="subschemas"):  # 2^29 copies if inlined naively
        refs_inlined({"$defs": defs, "type": "object", "properties": {"x": {"$ref": "#/$defs/L29"}}})


def test_the_generic_wrapper_cut_off_before_a_call_is_named_says_nothing():
    for cut in ('{"tool_calls', '{ "tool_calls": [{"', '{"tool_calls": [{"name": "'):
        assert parse_tool_calls("generic", cut, request().offered_tools()) == (None, [])


@pytest.mark.parametrize(("pattern", "good", "bad"), [
    (r"^\d{3}$", "123", "12a"),  # \d was passed to GBNF as it is: the grammar did not compile
    (r"^\w+@\S+$", "a_1@x.y", "a b@x"),
    (r"[a-z]+", "12abc34", "1234"),  # JSON Schema's patterns are unanchored: it matches anywhere in the string
    (r"^ab", "abzz", "zab"),
    (r"^[\d-]+$", "12-3", "12a"),
])  # fmt: skip
def test_a_patterns_classes_and_missing_anchors_mean_what_json_schema_says(vocab, pattern, good, bad):
    grammar = json_schema_grammar({"type": "string", "pattern": pattern})
    assert grammar_walk(vocab, grammar, [], json.dumps(good)) == "accepted"
    assert grammar_walk(vocab, grammar, [], json.dumps(bad)) != "accepted"  # refused, or it must go on


def test_a_patterns_any_character_cannot_close_the_json_string_early(vocab):
    grammar = json_schema_grammar({"type": "string", "pattern": "^.+$"})  # the converter's `.` took a quote
    assert grammar_walk(vocab, grammar, [], '"ab"') == "accepted"
    assert grammar_walk(vocab, grammar, [], '"a"b"') != "accepted"
