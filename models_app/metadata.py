"""Read a model's metadata from its headers, never its weights. Imports nothing from Django.

GGUF (v2, v3; little-endian only): magic `GGUF`, u32 version, u64 tensor count, u64 key/value count, the
key/value pairs, then one info record per tensor (name, dims, type, offset). The file is memory-mapped and
walked with bounds checks; arrays (token lists, merges) are skipped, keeping only their length, so a 262k-token
vocabulary costs one tight loop over its string lengths and the tensor data is never touched.

SafeTensors: an 8-byte little-endian header length, then a JSON header of {name: {dtype, shape, data_offsets}}.
A model is one `.safetensors` file or a directory (with `model.safetensors.index.json` for shards), with
`config.json` and `tokenizer_config.json` beside it for architecture, context length and chat template.

Every count, length and offset is checked against the file before anything is allocated; anything wrong raises
`MetadataError`, the only exception this module lets out."""

import collections
import hashlib
import itertools
import json
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gguf.constants import GGMLQuantizationType, LlamaFileType

MAX_STRING = 16 * 1024 * 1024  # a chat template is kilobytes
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_DIMS = 8
MAX_ARRAY_DEPTH = 4
MAX_HPARAM = 2**31 - 1  # context length, layers, heads, ...: a PositiveIntegerField holds them
MAX_JSON_BYTES = 64 * 1024 * 1024
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")

# GGUF value types: id -> (struct, size)
_SCALARS = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
    4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
    10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


# Architectures llama.cpp runs as encoders only (BERT and its kin): they embed, and cannot generate text.
ENCODER_ARCHITECTURES = frozenset({"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
                                   "jina-bert-v3", "eurobert"})  # fmt: skip


class MetadataError(Exception):
    """The path is not a model we can read: not a regular file, bad magic, truncated, absurd sizes, ..."""


@dataclass
class ModelMetadata:
    format: str  # "gguf" or "safetensors"
    file_size: int  # all files of the model together
    files: list[str] = field(default_factory=list)
    architecture: str | None = None
    name: str | None = None
    size_label: str | None = None
    quantization: str | None = None  # GGUF file type (Q4_K_M, F16, ...) or SafeTensors precision (BF16, ...)
    context_length: int | None = None
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None
    vocab_size: int | None = None
    chat_template: str | None = None
    tensor_count: int = 0
    parameter_count: int = 0
    values: dict = field(default_factory=dict, repr=False)  # GGUF scalar key/values; arrays as their length

    @property
    def chat_template_sha256(self) -> str | None:
        return hashlib.sha256(self.chat_template.encode()).hexdigest() if self.chat_template else None

    def summary(self) -> dict:
        """The JSON stored on the model row: everything above but the raw key/values and the template text."""
        data = asdict(self)
        del data["values"], data["chat_template"]
        for key, value in data.items():  # header strings are untrusted, and PostgreSQL's jsonb cannot hold U+0000
            if isinstance(value, str):
                data[key] = value.replace("\x00", "")
        data["has_chat_template"] = self.chat_template is not None
        data["chat_template_sha256"] = self.chat_template_sha256
        return data


def read_metadata(path: str | Path) -> ModelMetadata:
    """Metadata of a GGUF file (the first shard of a split model), a .safetensors file or a SafeTensors folder."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise MetadataError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        return read_safetensors_metadata(path)
    if path.suffix == ".safetensors":
        return read_safetensors_metadata(path)
    return read_gguf_metadata(path)


# -- GGUF ----------------------------------------------------------------------------------------------------


def read_gguf_metadata(path: str | Path) -> ModelMetadata:
    """Read a GGUF file's header; for `-00001-of-0000N.gguf`, every shard's tensor infos too."""
    path = Path(path)
    values, tensors, size = _read_gguf(path)
    files = [str(path)]
    split = SPLIT_RE.match(path.name)
    if split:
        if split["no"] != "00001":
            raise MetadataError(f"{path.name} is not the first shard of its split model")
        for no in range(2, int(split["count"]) + 1):
            shard = path.with_name(f"{split['stem']}-{no:05d}-of-{split['count']}.gguf")
            _, more, more_size = _read_gguf(shard, want_values=False)
            tensors.extend(more)
            size += more_size
            files.append(str(shard))
    arch = values.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    def arch_int(key: str) -> int | None:
        # llama.cpp reads these as u32; a negative or larger value is no size at all (and would not fit the row)
        value = values.get(f"{arch}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_HPARAM else None

    template = values.get("tokenizer.chat_template")
    return ModelMetadata(
        format="gguf",
        file_size=size,
        files=files,
        architecture=arch,
        name=_str(values.get("general.name")),
        size_label=_str(values.get("general.size_label")),
        quantization=_gguf_quantization(values.get("general.file_type"), tensors),
        context_length=arch_int("context_length"),
        block_count=arch_int("block_count"),
        embedding_length=arch_int("embedding_length"),
        head_count=arch_int("attention.head_count"),
        head_count_kv=arch_int("attention.head_count_kv"),
        key_length=arch_int("attention.key_length"),
        value_length=arch_int("attention.value_length"),
        vocab_size=values.get("tokenizer.ggml.tokens")
        if isinstance(values.get("tokenizer.ggml.tokens"), int)
        else None,
        chat_template=template if isinstance(template, str) else None,
        tensor_count=len(tensors),
        parameter_count=sum(elements for elements, _type in tensors),
        values=values,
    )


def _read_gguf(path: Path, *, want_values: bool = True) -> tuple[dict, list[tuple[int, int]], int]:
    """(key/values, [(elements, ggml type)] per tensor, file size) of one GGUF file."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise MetadataError(f"{path.name} is too short to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return *_GGUFWalker(buf, size, path.name).read(want_values), size


class _GGUFWalker:
    def __init__(self, buf, size: int, name: str):
        self.buf, self.size, self.name, self.pos = buf, size, name, 0

    def read(self, want_values: bool) -> tuple[dict, list[tuple[int, int]]]:
        magic = bytes(self.buf[:4])
        if magic == b"FUGG":
            raise MetadataError("big-endian GGUF files are not supported")
        if magic != b"GGUF":
            raise MetadataError(f"{self.name} is not a GGUF file (bad magic {magic!r})")
        self.pos = 4
        version = self.u32()
        if version not in (2, 3):
            raise MetadataError(f"unsupported GGUF version {version} (2 and 3 are)")
        tensor_count, kv_count = self.u64(), self.u64()
        if kv_count > MAX_KV:
            raise MetadataError(f"absurd key/value count {kv_count}")
        if tensor_count > MAX_TENSORS:
            raise MetadataError(f"absurd tensor count {tensor_count}")
        values = {}
        for _ in range(kv_count):
            key = self.string()
            value = self.value(self.u32(), depth=0)
            if want_values:
                values[key] = value
        tensors = []
        for _ in range(tensor_count):
            self.skip_string()  # name
            n_dims = self.u32()
            if n_dims > MAX_DIMS:
                raise MetadataError(f"absurd tensor rank {n_dims}")
            elements = math.prod(self.u64() for _ in range(n_dims))
            ggml_type = self.u32()
            self.u64()  # data offset
            tensors.append((elements, ggml_type))
        return values, tensors

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise MetadataError(f"{self.name} is truncated (needs {n} bytes at offset {self.pos})")

    def u32(self) -> int:
        self.need(4)
        self.pos += 4
        return _U32.unpack_from(self.buf, self.pos - 4)[0]

    def u64(self) -> int:
        self.need(8)
        self.pos += 8
        return _U64.unpack_from(self.buf, self.pos - 8)[0]

    def string(self) -> str:
        n = self.skip_string()
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def skip_string(self) -> int:
        """Step over one string; return its length."""
        n = self.u64()
        if n > MAX_STRING:
            raise MetadataError(f"absurd string length {n}")
        self.need(n)
        self.pos += n
        return n

    def value(self, value_type: int, depth: int):
        if value_type in _SCALARS:
            scalar = _SCALARS[value_type]
            self.need(scalar.size)
            self.pos += scalar.size
            return scalar.unpack_from(self.buf, self.pos - scalar.size)[0]
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise MetadataError("arrays nested too deeply")
            item_type, count = self.u32(), self.u64()
            if item_type in _SCALARS:
                self.need(count * _SCALARS[item_type].size)
                self.pos += count * _SCALARS[item_type].size
            elif item_type == _STRING:
                self.need(count * 8)  # every string has at least its length
                self.skip_strings(count)
            elif item_type == _ARRAY:
                self.need(count * 12)
                for _ in range(count):
                    self.value(_ARRAY, depth + 1)
            else:
                raise MetadataError(f"unknown GGUF array item type {item_type}")
            return count
        raise MetadataError(f"unknown GGUF value type {value_type}")

    def skip_strings(self, count: int) -> None:
        # The hot loop (262k tokens for Gemma 3): local names, no per-item bounds check; the end is checked once,
        # and a length pointing past the end stops the walk at the first check below.
        buf, unpack, pos, end = self.buf, _U64.unpack_from, self.pos, self.size - 8
        for _ in itertools.repeat(None, count):
            if pos > end:
                break
            pos += 8 + unpack(buf, pos)[0]
        else:
            if pos <= self.size:
                self.pos = pos
                return
        raise MetadataError(f"{self.name} is truncated inside a string array")


def _gguf_quantization(file_type, tensors: list[tuple[int, int]]) -> str | None:
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No (known) file type: name it after the type holding most of the parameters.
    by_type = collections.Counter()
    for elements, ggml_type in tensors:
        by_type[ggml_type] += elements
    if not by_type:
        return None
    try:
        return GGMLQuantizationType(by_type.most_common(1)[0][0]).name
    except ValueError:
        return None


def _str(value) -> str | None:
    return value if isinstance(value, str) else None


# -- SafeTensors ---------------------------------------------------------------------------------------------


def read_safetensors_metadata(path: str | Path) -> ModelMetadata:
    """A .safetensors file, or a folder with model.safetensors.index.json (shards) or *.safetensors files."""
    path = Path(path)
    if path.is_dir():
        folder = path
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MetadataError("model.safetensors.index.json has no valid weight_map")
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in folder.glob("*.safetensors"))
        if not names:
            raise MetadataError(f"{folder} holds no .safetensors files")
        for name in names:  # shard names come from a file we do not trust
            if "/" in name or "\\" in name or name in (".", "..") or not name.endswith(".safetensors"):
                raise MetadataError(f"invalid shard name {name!r} in the index")
        shards = [folder / name for name in names]
    else:
        folder, shards = path.parent, [path]
    dtypes: collections.Counter = collections.Counter()
    tensor_count = parameter_count = size = 0
    for shard in shards:
        header, shard_size = _read_safetensors_header(shard)
        size += shard_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _tensor_info(name, info, shard.name)
            elements = math.prod(shape)
            tensor_count += 1
            parameter_count += elements
            dtypes[dtype] += elements
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def cfg_int(*keys: str) -> int | None:
        for source in (config, text_config):
            for key in keys:
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_HPARAM:
                    return value
        return None

    architectures = config.get("architectures")
    architecture = architectures[0] if isinstance(architectures, list) and architectures else config.get("model_type")
    tokenizer_config = (
        _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    )
    return ModelMetadata(
        format="safetensors",
        file_size=size,
        files=[str(s) for s in shards],
        architecture=architecture if isinstance(architecture, str) else None,
        name=folder.name if path.is_dir() else path.stem,
        quantization=dtypes.most_common(1)[0][0] if dtypes else None,
        context_length=cfg_int("max_position_embeddings", "n_positions", "max_seq_len"),
        block_count=cfg_int("num_hidden_layers", "n_layer"),
        embedding_length=cfg_int("hidden_size", "n_embd"),
        head_count=cfg_int("num_attention_heads", "n_head"),
        head_count_kv=cfg_int("num_key_value_heads"),
        vocab_size=cfg_int("vocab_size"),
        chat_template=_chat_template(tokenizer_config.get("chat_template")),
        tensor_count=tensor_count,
        parameter_count=parameter_count,
    )


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise MetadataError(f"{path.name} is truncated (no header length)")
        (length,) = _U64.unpack(raw)
        if length > min(MAX_JSON_BYTES, size - 8):
            raise MetadataError(f"{path.name} has an absurd header length {length}")
        header = _parse_json(f.read(length), path.name)
    if not isinstance(header, dict):
        raise MetadataError(f"{path.name}: the header is not a JSON object")
    return header, size


def _tensor_info(name: str, info, shard: str) -> tuple[str, list[int]]:
    if not isinstance(info, dict):
        raise MetadataError(f"{shard}: tensor {name!r} is not an object")
    dtype, shape = info.get("dtype"), info.get("shape")
    if dtype not in SAFETENSORS_DTYPES:
        raise MetadataError(f"{shard}: tensor {name!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**48 for d in shape)
    ):
        raise MetadataError(f"{shard}: tensor {name!r} has an invalid shape")
    return dtype, shape


def _chat_template(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
        return template if isinstance(template, str) else None
    return None


def _read_json(path: Path) -> dict:
    with _open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > MAX_JSON_BYTES:
            raise MetadataError(f"{path.name} is too large")
        data = _parse_json(f.read(), path.name)
    if not isinstance(data, dict):
        raise MetadataError(f"{path.name} is not a JSON object")
    return data


def _parse_json(raw: bytes, name: str):
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MetadataError(f"{name}: invalid JSON ({type(exc).__name__})") from None


class _open_regular:
    """Open a path for reading only if it is a regular file: opening a FIFO would block, a device could be
    endless. O_NONBLOCK makes the open itself safe; fstat then checks what was actually opened."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            # Windows has no O_NONBLOCK (nor FIFOs a path could name) and needs O_BINARY, which POSIX lacks.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise MetadataError(f"cannot read {self.path}: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MetadataError(f"{self.path} is not a regular file")
        self.file = os.fdopen(fd, "rb")
        return self.file

    def __exit__(self, *exc):
        self.file.close()


KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # ggml's block sizes per element


def kv_bytes_per_token(summary: dict, cache_type: str = "f16") -> int:
    """Bytes of KV cache one token (one cell) takes: every layer's keys and values for its KV heads."""
    layers, embd = summary.get("block_count") or 0, summary.get("embedding_length") or 0
    heads = summary.get("head_count") or 1
    heads_kv = summary.get("head_count_kv") or heads
    k = summary.get("key_length") or embd // heads
    v = summary.get("value_length") or embd // heads
    return int(layers * heads_kv * (k + v) * KV_BYTES_PER_VALUE[cache_type])


def estimate_memory(summary: dict, n_cells: int, cache_type: str = "f16") -> int:
    """Bytes a loaded model needs: its files (weights) plus a KV cache of `n_cells` cells."""
    return int(summary.get("file_size") or 0) + n_cells * kv_bytes_per_token(summary, cache_type)


def context_that_fits(summary: dict, trained: int, budget: int, cache_type: str = "f16", slots: int = 1) -> int:
    """The largest context, up to the trained one, whose KV cache (one per slot: `slots` of them) fits beside the
    weights in half of `budget` (the other half leaves room for a second model and llama.cpp's compute buffers), in
    steps of 256 tokens; at least 2,048 (or the trained context, if smaller)."""
    per_token = kv_bytes_per_token(summary, cache_type) * slots
    room = budget // 2 - int(summary.get("file_size") or 0)
    fits = room // per_token if per_token else trained
    return max(min(trained, fits // 256 * 256), min(trained, 2048))
