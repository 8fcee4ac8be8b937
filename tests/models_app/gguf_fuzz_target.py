"""atheris target for the GGUF header reader (run by test_gguf_fuzz.py in a subprocess, as libFuzzer wants the
process): `python tests/models_app/gguf_fuzz_target.py CORPUS_DIR -max_total_time=25 ...`.

Each input is written to one file and read as a model: anything but `MetadataError` escaping, or a result that
the model row could not store, is a crash that libFuzzer saves with the input that caused it. libFuzzer's own
-timeout and -rss_limit_mb bound the time and memory per input."""

import json
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: models_app

import gguf.constants  # noqa: F401  (uninstrumented: tracing numpy costs 1.3 GB and only adds noise)

with atheris.instrument_imports(include=["models_app"]):
    from models_app.metadata import MetadataError, ModelMetadata, read_metadata

PATH = Path(tempfile.mkdtemp(prefix="gguf-fuzz-")) / "model.gguf"
INT32_MAX = 2**31 - 1  # PositiveIntegerField, the narrowest integer column a result reaches


def check(metadata: ModelMetadata) -> None:
    """What `model_register` stores must fit its columns on SQLite and PostgreSQL alike."""
    summary = json.dumps(metadata.summary(), allow_nan=False)
    assert "\\u0000" not in summary, "PostgreSQL's jsonb cannot hold U+0000"
    assert metadata.context_length is None or 0 <= metadata.context_length <= INT32_MAX, metadata.context_length
    assert len(metadata.quantization or "") <= 32, metadata.quantization


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    try:
        metadata = read_metadata(PATH)
    except MetadataError:
        return
    check(metadata)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
