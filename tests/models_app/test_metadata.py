"""The GGUF header reader: real files, and broken ones that must raise MetadataError."""

import struct

import pytest

from models_app.metadata import MetadataError, read_gguf_metadata
from models_app.services import default_model_path


def test_it_reads_smollm2s_header():
    metadata = read_gguf_metadata(default_model_path())
    assert metadata.architecture == "llama"
    assert metadata.context_length == 8192
    assert "<|im_start|>" in metadata.chat_template
    assert metadata.summary()["file_size"] == default_model_path().stat().st_size


def header(*kv: bytes, version=3, count=None) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, 0, len(kv) if count is None else count) + b"".join(kv)


def string(s: str) -> bytes:
    return struct.pack("<Q", len(s)) + s.encode()


def test_a_minimal_valid_header_is_read(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(
        header(
            string("general.architecture") + struct.pack("<I", 8) + string("llama"),
            string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 2048),
            string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + string("a") + string("b"),
        )
    )
    metadata = read_gguf_metadata(path)
    assert (metadata.architecture, metadata.context_length) == ("llama", 2048)
    assert metadata.values["tokenizer.ggml.tokens"] == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"NOPE" + b"\0" * 20, "bad magic"),
        (b"FUGG" + b"\0" * 20, "big-endian"),
        (header(version=1), "unsupported GGUF version"),
        (header(count=1 << 40), "absurd key/value count"),
        (header(struct.pack("<Q", 1 << 40)), "absurd string length"),
        (header(string("k") + struct.pack("<I", 99)), "unknown GGUF value type"),
        (header(string("k") + struct.pack("<IIQ", 9, 8, 1 << 40)), "absurd array length"),
    ],
    ids=["bad magic", "big-endian", "old version", "huge count", "huge string", "bad type", "huge array"],
)
def test_broken_headers_raise_metadata_error(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(MetadataError, match=message):
        read_gguf_metadata(path)


def test_every_truncation_of_a_valid_header_raises_metadata_error(tmp_path):
    full = header(string("general.architecture") + struct.pack("<I", 8) + string("llama"))
    path = tmp_path / "cut.gguf"
    for length in range(len(full)):
        path.write_bytes(full[:length])
        with pytest.raises(MetadataError):
            read_gguf_metadata(path)


def test_a_directory_is_not_a_model(tmp_path):
    with pytest.raises(MetadataError, match="not a regular file"):
        read_gguf_metadata(tmp_path)
