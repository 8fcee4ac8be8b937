#!/usr/bin/env python
"""Embedding throughput, Minerva against llama-server `--embeddings`, same model, same run.

Starts both servers with the same GGUF (llama-server with mean pooling; Minerva mean-pools a model that declares no
pooling), then sends the same ~30-token texts to each server's /v1/embeddings in two ways: one request carrying
every input, and --clients concurrent clients sending one input per request. Prints inputs/s and tokens/s
(tokens as each server's `usage.prompt_tokens` counts them).

    python bench/embed_compare.py --llama-server /path/to/llama-server --model model.gguf [--inputs 256]
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embeddings import texts

import bench  # bench/bench.py: server start-up shared with the generation benchmark


def start_llama_server(args, work: Path) -> tuple[subprocess.Popen, str]:
    port = bench.free_port()
    log = work / "llama-server.log"
    cmd = [
        args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port), "--embeddings",
        "--pooling", "mean", "-np", str(args.slots), "-c", str(args.n_ctx * args.slots), "-b", str(args.n_ctx),
        "-ub", str(args.n_ctx), "-ngl", "999", "-fa", "auto", "--no-webui",
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    bench.wait_ready(f"http://127.0.0.1:{port}/health", process, log)
    return process, f"http://127.0.0.1:{port}/v1"


async def embed(client, url: str, model: str, inputs: list[str]) -> int:
    response = await client.post(f"{url}/embeddings", json={"model": model, "input": inputs}, timeout=600)
    response.raise_for_status()
    body = response.json()
    assert len(body["data"]) == len(inputs), body
    return body["usage"]["prompt_tokens"]


async def measure(url: str, model: str, inputs: list[str], clients: int) -> dict:
    async with bench.httpx.AsyncClient() as client:
        await embed(client, url, model, inputs[:8])  # warm-up: load, first graphs
        started = time.perf_counter()
        tokens = await embed(client, url, model, inputs)
        one = time.perf_counter() - started

        queue = list(inputs)
        counted = []

        async def worker():
            while queue:
                counted.append(await embed(client, url, model, [queue.pop()]))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        many = time.perf_counter() - started
    n = len(inputs)
    return {
        "one_request": {"seconds": round(one, 3), "inputs_per_s": round(n / one, 1),
                        "tokens_per_s": round(tokens / one)},
        f"{clients}_clients": {"seconds": round(many, 3), "inputs_per_s": round(n / many, 1),
                               "tokens_per_s": round(sum(counted) / many)},
        "tokens": tokens,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slots", type=int, default=16, help="llama-server -np; Minerva's slots and embedding batch")
    parser.add_argument("--n-ctx", type=int, default=2048, help="tokens per llama.cpp batch, both servers")
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--n-batch", type=int, default=2048)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    inputs = texts(args.inputs)
    work = Path(tempfile.mkdtemp(prefix="embed-compare-"))
    servers = {}
    try:
        servers["llama-server"] = start_llama_server(args, work)
        process, url, _model = bench.start_minerva(args, work, args.slots, {"EMBEDDING_BATCH": str(args.slots)})
        servers["minerva"] = (process, url)
        results = {}
        for name, (_process, url) in servers.items():
            results[name] = asyncio.run(measure(url, Path(args.model).stem if name == "minerva" else "m", inputs,
                                                args.clients))  # fmt: skip
            print(name, json.dumps(results[name]), flush=True)
    finally:
        for process, _url in servers.values():
            process.terminate()
        for process, _url in servers.values():
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": platform.node(), "model": Path(args.model).name, "inputs": args.inputs,
              "clients": args.clients, "results": results}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
