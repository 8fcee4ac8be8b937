#!/usr/bin/env python
"""Interactive time to first token while a batch runs, against idle; and the batch's throughput.

Starts `manage.py serve` from this checkout on a fresh data dir, measures --probes streamed chat requests one after
another with nothing else running, submits a --lines batch (each line --max-tokens tokens, EOS ignored), measures
the same probes while it runs, then waits for the batch and prints one JSON object.

    python bench/batch_ttft.py --lines 500 --max-tokens 16 [--batch-slots N]
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ttft(base: str, i: int) -> float:
    body = {"model": MODEL, "stream": True, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": f"Probe {i}: say hello."}]}  # fmt: skip
    started = time.monotonic()
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        first = None
        for line in lines:
            if line.startswith("data: {") and any(c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
                first = time.monotonic() - started
                break
        for _ in lines:  # read the rest, so the next probe starts on an idle model
            pass
    return first * 1000


def probes(base: str, n: int) -> dict:
    times = sorted(ttft(base, i) for i in range(n))
    return {"n": n, "p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(0.95 * (n - 1))], 1),
            "max_ms": round(times[-1], 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--batch-slots", type=int, default=0)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="minerva-batch-bench-"))
    env = {**os.environ, "MINERVA_DATA_DIR": str(data), "MINERVA_BATCH_SLOTS": str(args.batch_slots),
           "MINERVA_LOG_LEVEL": "WARNING"}  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    port = free_port()
    log = (data / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "manage.py", "serve", "--port", str(port)], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and serve.poll() is None, "serve did not come up"
            time.sleep(0.5)
        ttft(base, -1)  # load the model
        idle = probes(base, args.probes)

        lines = "".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": MODEL, "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}]}}) + "\n"
            for i in range(args.lines))  # fmt: skip
        upload = httpx.post(f"{base}/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", lines.encode())})
        started = time.monotonic()
        batch = httpx.post(f"{base}/batches", json={"input_file_id": upload.json()["id"],
                           "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()  # fmt: skip
        time.sleep(2)  # let the lanes fill their slots
        busy = probes(base, args.probes)
        progress = httpx.get(f"{base}/batches/{batch['id']}").json()["request_counts"]
        while (batch := httpx.get(f"{base}/batches/{batch['id']}").json())["status"] not in ("completed", "failed"):
            time.sleep(1)
        elapsed = time.monotonic() - started
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "lines": args.lines, "max_tokens": args.max_tokens, "batch_slots": args.batch_slots or "default",
        "idle_ttft": idle, "ttft_during_batch": busy, "batch_done_when_probes_ended": progress,
        "batch": {"status": batch["status"], "seconds": round(elapsed, 1), "counts": batch["request_counts"],
                  "lines_per_s": round(args.lines / elapsed, 2),
                  "output_tok_per_s": round(batch["usage"]["output_tokens"] / elapsed, 1)},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
