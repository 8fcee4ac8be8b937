#!/usr/bin/env python
"""Time to the first tool-call byte for a long tool call, against a running `manage.py serve`.

Sends streamed chat completions that force a function whose one string argument must be at least --min-length
characters (SmolLM2 writes ~1,000 tokens for 5,000: ~5 characters a token), and measures from the request to: the
first chunk, the first chunk carrying `tool_calls`, the first byte of the call's arguments, and the end of the stream.
Run it once per checkout (each serving on its own port, with its own MINERVA_DATA_DIR) and compare:

    python bench/tool_call_ttfb.py --base-url http://127.0.0.1:18432/v1 --label before --runs 3
"""

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

try:
    import httpx2 as httpx
except ImportError:  # the GPU machine has plain httpx
    import httpx

ASK = "Write a detailed essay about the history of the Roman Empire, from its founding to its fall, to essay.txt."


def body(model: str, min_length: int, max_tokens: int) -> dict:
    content = {"type": "string", "description": "The whole text of the file", "minLength": min_length,
               "maxLength": min_length + 600}  # fmt: skip
    tool = {"type": "function", "function": {"name": "write_file", "description": "Write the essay to a file",
            "parameters": {"type": "object", "properties": {"content": content}, "required": ["content"]}}}  # fmt: skip
    return {"model": model, "messages": [{"role": "user", "content": ASK}], "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "write_file"}}, "parallel_tool_calls": False,
            "temperature": 0, "seed": 1, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip


def one_run(base_url: str, request: dict) -> dict:
    """One streamed request; seconds from sending it to each milestone."""
    first_chunk = first_call = first_argument = None
    arguments, usage, finish = [], None, None
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/chat/completions", json=request, timeout=1800) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter() - started
            chunk = json.loads(line[6:])
            first_chunk = first_chunk if first_chunk is not None else now
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                finish = choice.get("finish_reason") or finish
                for call in choice["delta"].get("tool_calls") or []:
                    first_call = first_call if first_call is not None else now
                    piece = (call.get("function") or {}).get("arguments") or ""
                    if piece and first_argument is None:
                        first_argument = now
                    arguments.append(piece)
    total = time.perf_counter() - started
    text = "".join(arguments)
    return {"first_chunk_s": round(first_chunk, 3), "first_tool_call_s": round(first_call, 3),
            "first_argument_byte_s": round(first_argument, 3), "total_s": round(total, 3),
            "completion_tokens": usage["completion_tokens"], "argument_chars": len(text),
            "content_chars": len(json.loads(text)["content"]), "finish_reason": finish,
            "load_average": round(load, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the serve's /v1, e.g. http://127.0.0.1:11434/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--label", default="", help="what this serve runs (before/after, a commit)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--min-length", type=int, default=5000, help="characters the argument must have")
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--out", type=Path, help="append the results as one JSON line to this file")
    args = parser.parse_args()

    request = body(args.model, args.min_length, args.max_tokens)
    runs = []
    for i in range(args.runs):
        runs.append(one_run(args.base_url, request))
        print(f"{args.label} run {i + 1}: {json.dumps(runs[-1])}", flush=True)
    medians = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0] if k.endswith("_s")}
    print(f"{args.label} median: {json.dumps(medians)}")
    if args.out:
        result = {"label": args.label, "date": date.today().isoformat(), "machine": platform.machine(),
                  "cpus": os.cpu_count(), "model": args.model, "min_length": args.min_length, "runs": runs,
                  "median": medians}  # fmt: skip
        with args.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
