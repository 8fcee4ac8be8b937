"""The engine on its own (no Django): real SmolLM2 through llama-cpp-python."""

import pytest

from inference.engine import ContextOverflow, PromptError, SamplingParams, get_model
from models_app.services import default_model_path


@pytest.fixture(scope="module")
def model():
    return get_model(str(default_model_path()), n_ctx=512)


def run(generation):
    text = "".join(generation)
    return text, generation.finish_reason, generation.completion_tokens


def test_the_same_seed_gives_the_same_text(model):
    prompt = model.chat_prompt([{"role": "user", "content": "Tell me a story."}])
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=24)
    assert run(model.generate(prompt, params)) == run(model.generate(prompt, params))


def test_a_prompt_that_fills_the_context_is_refused(model):
    with pytest.raises(ContextOverflow, match="maximum context length is 512 tokens"):
        model.generate(model.text_prompt("word " * 600), SamplingParams())


def test_max_tokens_is_clamped_to_the_room_left(model):
    prompt = model.text_prompt("one two " * 250)  # ~500 of the 512 tokens
    _text, finish, tokens = run(model.generate(prompt, SamplingParams(temperature=0, max_tokens=1000)))
    assert finish == "length"
    assert tokens == 512 - len(prompt)


def test_cancelling_stops_at_the_next_token(model):
    prompt = model.text_prompt("Once upon a time")
    seen = []
    generation = model.generate(prompt, SamplingParams(max_tokens=200), cancelled=lambda: len(seen) >= 3)
    for piece in generation:
        seen.append(piece)
    assert generation.finish_reason == "cancelled"
    assert generation.completion_tokens == 3


def test_the_models_own_chat_template_renders_the_prompt(model):
    prompt = model.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    rendered = model.llama.detokenize(prompt, special=True).decode()
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")


def test_a_base_model_without_a_template_cannot_chat(tmp_path, model):
    model.chat_formatter, saved = None, model.chat_formatter
    try:
        with pytest.raises(PromptError, match="no chat template"):
            model.chat_prompt([{"role": "user", "content": "Hi"}])
    finally:
        model.chat_formatter = saved
