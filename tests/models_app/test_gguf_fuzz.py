"""Coverage-guided fuzzing of the GGUF header reader with atheris, time-boxed, seeded from real headers (the
default model's) and tiny GGUFs written with gguf.GGUFWriter. The target (gguf_fuzz_target.py) runs in a
subprocess because libFuzzer owns its process: it stops at the first input that lets anything but
`MetadataError` out, takes longer than -timeout or allocates more than -malloc_limit_mb at once, and saves that
input. (-rss_limit_mb is the whole process, corpus included: libFuzzer keeps every interesting input, up to 2 MiB
each here, in memory, which reached 1.3 GB in a slower run.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from models_app.bundled import default_model_path
from models_app.metadata import read_metadata
from tests.models_app.test_metadata import write_gguf

TARGET = Path(__file__).with_name("gguf_fuzz_target.py")
# MINERVA_FUZZ_SECONDS=600 fuzzes longer (the test's timeout follows).
SECONDS = int(os.environ.get("MINERVA_FUZZ_SECONDS", 25))
REAL_HEADER_BYTES = 2 * 1024 * 1024  # SmolLM2's key/values and tensor infos end at 1.7 MiB


def write_every_kind(path: Path) -> None:
    """A GGUF with a value of every type, arrays of numbers, strings and arrays, and a chat template."""
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_uint8("k.u8", 1)
    writer.add_int8("k.i8", -1)
    writer.add_uint16("k.u16", 2)
    writer.add_int16("k.i16", -2)
    writer.add_uint32("llama.context_length", 4096)
    writer.add_int32("llama.block_count", 2)
    writer.add_float32("k.f32", 0.5)
    writer.add_bool("k.bool", True)
    writer.add_uint64("k.u64", 2**40)
    writer.add_int64("k.i64", -(2**40))
    writer.add_float64("k.f64", 1.5)
    writer.add_array("k.ints", [1, 2, 3])
    writer.add_array("k.nested", [[1, 2], ["a"]])
    writer.add_token_list(["<s>", "a"])
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("t", np.zeros((2, 3), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def seed_corpus(folder: Path) -> None:
    real = folder / "smollm2-header.gguf"
    with default_model_path().open("rb") as f:
        real.write_bytes(f.read(REAL_HEADER_BYTES))
    assert read_metadata(real).tensor_count == 272, "the seed must be the whole header, to fuzz every part of it"
    write_gguf(folder / "tiny.gguf", tensors=2)
    write_gguf(folder / "no-file-type.gguf", tensors=1, template="", file_type=False)
    write_every_kind(folder / "every-kind.gguf")


@pytest.mark.slow
@pytest.mark.timeout(SECONDS + 90)
def test_fuzzed_gguf_headers_only_ever_raise_metadata_error(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed_corpus(corpus)
    result = subprocess.run(
        [sys.executable, str(TARGET), str(corpus), f"-max_total_time={SECONDS}", "-timeout=5", "-malloc_limit_mb=512",
         "-rss_limit_mb=3072",
         f"-max_len={REAL_HEADER_BYTES}", f"-artifact_prefix={tmp_path}/", "-seed=1"],
        capture_output=True, text=True, timeout=SECONDS + 60,
    )  # fmt: skip
    crashes = [f"{p.name}: {p.read_bytes()[:200]!r}" for p in tmp_path.iterdir() if p.is_file()]
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{crashes}"
    runs = int(re.search(r"Done (\d+) runs", result.stderr)[1])
    assert runs > 100  # it really fuzzed
