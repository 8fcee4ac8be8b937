"""Read a model file's metadata from its header without loading weights. Imports nothing from Django.

GGUF layout (little-endian): magic `GGUF`, u32 version, u64 tensor count, u64 key/value count, then the
key/value pairs. Arrays (token lists, merges) are skipped rather than materialised: only their length is kept."""

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAX_STRING = 64 * 1024 * 1024  # a chat template is kilobytes; anything near this is corrupt or hostile
MAX_KV = 1 << 20
MAX_ARRAY = 1 << 28

# GGUF value types: id -> (struct format, size)
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9


class MetadataError(Exception):
    """The file is not a model file we can read (bad magic, truncated, absurd sizes, unsupported version)."""


@dataclass
class ModelMetadata:
    format: str
    file_size: int
    values: dict = field(default_factory=dict)  # scalar and string key/values; arrays as their length

    @property
    def architecture(self) -> str | None:
        return self.values.get("general.architecture")

    @property
    def context_length(self) -> int | None:
        value = self.values.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def chat_template(self) -> str | None:
        return self.values.get("tokenizer.chat_template")

    def _arch_int(self, key: str) -> int | None:
        value = self.values.get(f"{self.architecture}.{key}")
        return int(value) if isinstance(value, int) else None

    def summary(self) -> dict:
        """The JSON stored on the model row: what a client needs, not the whole header."""
        return {
            "architecture": self.architecture,
            "name": self.values.get("general.name"),
            "context_length": self.context_length,
            "has_chat_template": self.chat_template is not None,
            "file_size": self.file_size,
            "block_count": self._arch_int("block_count"),
            "embedding_length": self._arch_int("embedding_length"),
            "head_count": self._arch_int("attention.head_count"),
            "head_count_kv": self._arch_int("attention.head_count_kv"),
            "key_length": self._arch_int("attention.key_length"),
            "value_length": self._arch_int("attention.value_length"),
        }


def estimate_memory(summary: dict, n_ctx_total: int) -> int:
    """Bytes a loaded model needs: its file (weights) plus an f16 KV cache of `n_ctx_total` cells."""
    layers, embd = summary.get("block_count") or 0, summary.get("embedding_length") or 0
    heads = summary.get("head_count") or 1
    heads_kv = summary.get("head_count_kv") or heads
    k = summary.get("key_length") or embd // heads
    v = summary.get("value_length") or embd // heads
    return int(summary.get("file_size") or 0) + layers * n_ctx_total * heads_kv * (k + v) * 2


def read_gguf_metadata(path: Path) -> ModelMetadata:
    """Read a GGUF file's key/value header."""
    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"{path} is not a regular file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            if magic == b"FUGG":
                raise MetadataError("big-endian GGUF files are not supported")
            if magic != b"GGUF":
                raise MetadataError(f"{path.name} is not a GGUF file (bad magic {magic!r})")
            (version,) = _unpack(f, "<I", 4)
            if version not in (2, 3):
                raise MetadataError(f"unsupported GGUF version {version}")
            _tensor_count, kv_count = _unpack(f, "<QQ", 16)
            if kv_count > MAX_KV:
                raise MetadataError(f"absurd key/value count {kv_count}")
            values = {}
            for _ in range(kv_count):
                key = _read_string(f)
                (value_type,) = _unpack(f, "<I", 4)
                values[key] = _read_value(f, value_type)
    except OSError as exc:
        raise MetadataError(f"cannot read {path}: {exc.strerror}") from None
    return ModelMetadata(format="gguf", file_size=path.stat().st_size, values=values)


def _unpack(f: BinaryIO, fmt: str, size: int) -> tuple:
    data = f.read(size)
    if len(data) != size:
        raise MetadataError("the file is truncated")
    return struct.unpack(fmt, data)


def _read_string(f: BinaryIO) -> str:
    (length,) = _unpack(f, "<Q", 8)
    if length > MAX_STRING:
        raise MetadataError(f"absurd string length {length}")
    data = f.read(length)
    if len(data) != length:
        raise MetadataError("the file is truncated")
    return data.decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, value_type: int):
    if value_type in _SCALARS:
        fmt, size = _SCALARS[value_type]
        return _unpack(f, fmt, size)[0]
    if value_type == _STRING:
        return _read_string(f)
    if value_type == _ARRAY:
        item_type, count = _unpack(f, "<IQ", 12)
        if count > MAX_ARRAY:
            raise MetadataError(f"absurd array length {count}")
        if item_type in _SCALARS:
            f.seek(_SCALARS[item_type][1] * count, 1)
        elif item_type == _STRING:
            for _ in range(count):
                (length,) = _unpack(f, "<Q", 8)
                if length > MAX_STRING:
                    raise MetadataError(f"absurd string length {length}")
                f.seek(length, 1)
        else:
            raise MetadataError(f"unsupported GGUF array item type {item_type}")
        return count
    raise MetadataError(f"unknown GGUF value type {value_type}")
