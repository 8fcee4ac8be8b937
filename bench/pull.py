"""How long `models pull` takes for a file of SIZE MiB from the local Hub stand-in (tests/hub_standin.py), and
what resuming costs: a whole pull, a pull whose connection is cut half-way (huggingface_hub retries with a Range
header), and a pull that finds half the file left by an earlier, stopped one.

usage: PYTHONPATH=. .venv/bin/python bench/pull.py [--size-mib 1024]
Runs in a temporary data dir (its own SQLite database and models folder); the GGUF is a valid header plus one
tensor of zeros, so the model registers like a real one."""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_gguf(path: Path, size_mib: int) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(1024)
    writer.add_head_count(8)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rows = size_mib * 2**20 // (1024 * 4)
    writer.add_tensor("token_embd.weight", np.zeros((rows, 1024), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="minerva-pull-bench-"))
    os.environ.update(MINERVA_DATA_DIR=str(tmp), DJANGO_SETTINGS_MODULE="minerva_project.settings",
                      HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    import django

    django.setup()
    from django.core.management import call_command

    from models_app import hub as hub_module
    from models_app.pulls import model_pull, pulled_dir
    from tests.hub_standin import StandIn, start

    call_command("migrate", verbosity=0)
    source = tmp / "source.gguf"
    write_gguf(source, args.size_mib)
    size = source.stat().st_size
    hub = start(StandIn())
    repo, name = "bench/Big-GGUF", "Big-F32.gguf"
    began = time.perf_counter()
    hub.add(repo, name, source)
    print(f"file: {size / 2**20:.0f} MiB; the stand-in hashed it in {time.perf_counter() - began:.1f} s")
    os.environ["HF_ENDPOINT"] = hub.url
    dest = pulled_dir(repo) / name

    def pull(label: str) -> None:
        lines: list[dict] = []
        began = time.perf_counter()
        model_pull(ref=f"{repo}:F32", progress=lines.append)
        took = time.perf_counter() - began
        verify = next(i for i, line in enumerate(lines) if line["status"] == "verifying sha256 digest")
        print(f"{label}: {took:.2f} s ({size / 2**20 / took:.0f} MiB/s), {verify - 1} progress lines, "
              f"GETs: {hub.ranges(name)}")  # fmt: skip
        hub.requests.clear()

    pull("whole pull")
    dest.unlink()
    hub.cut_after[name] = size // 2
    pull("cut half-way, resumed by huggingface_hub's retry")
    dest.unlink()
    with source.open("rb") as f:
        hub_module.partial_path(dest).write_bytes(f.read(size // 2))
    pull("resumed from a stopped pull's half file")
    began = time.perf_counter()
    hub_module.sha256_of(dest)
    print(f"sha256 of the file alone: {time.perf_counter() - began:.2f} s")
    hub.server.shutdown()


if __name__ == "__main__":
    main()
