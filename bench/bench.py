#!/usr/bin/env python
"""Minerva against llama.cpp's llama-server, same model, same load, same run.

Starts both servers (llama-server from --llama-server, Minerva's `manage.py serve` from this checkout), then for
each concurrency level sends streamed chat completions (~100-token prompts, --max-tokens output tokens with EOS
suppressed via `ignore_eos`) and prints aggregate tok/s, TTFT p50/p95 and inter-token latency p50/p95 side by
side, with Minerva/llama-server ratios. Both servers get the same slots (= the highest level), per-slot context,
batch size, flash attention `auto` and a non-unified KV cache.

    python bench/bench.py --llama-server /path/to/llama-server --model model.gguf --levels 1,4
"""

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import httpcore2  # noqa: F401  (the GPU machine has httpx2 for huggingface_hub, without its transport)
    import httpx2 as httpx
except ImportError:  # the GPU machine has plain httpx
    import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the quick brown fox jumps over the lazy dog while a curious cat watches from the garden wall and "
    "the river flows past old stone bridges under a pale autumn sky full of drifting clouds and birds "
).split()


def prompt(i: int, n_words: int = 80) -> str:
    # A distinct number first, so no request reuses another's cached prefix (fair to both servers).
    body = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n_words))
    return f"Request {i}. Continue this text for as long as you can: {body}"


# --edit: the code block each request asks the model to rewrite with one change (an agent's edit: most of the answer
# repeats the prompt, which is what prompt-lookup drafting predicts).
EDIT_CODE = """\
class Buffer:
    \"\"\"Collects lines and writes them out in batches.\"\"\"

    def __init__(self, sink, limit=64):
        self.sink = sink
        self.limit = limit
        self.lines = []
        self.written = 0

    def add(self, line):
        if not isinstance(line, str):
            raise TypeError("a line must be a string")
        self.lines.append(line.rstrip("\\n"))
        if len(self.lines) >= self.limit:
            self.flush()

    def flush(self):
        if not self.lines:
            return 0
        text = "\\n".join(self.lines) + "\\n"
        self.sink.write(text)
        count = len(self.lines)
        self.written += count
        self.lines.clear()
        return count

    def close(self):
        count = self.flush()
        self.sink.close()
        return self.written, count


def copy_lines(source, sink, limit=64):
    buffer = Buffer(sink, limit)
    for line in source:
        buffer.add(line)
    return buffer.close()
"""


def edit_prompt(i: int) -> str:
    # A completion prompt, so that small models copy (asked in a chat, SmolLM2 and Gemma 3 270M explain the code).
    return (
        f"Request {i}. Original code:\n```python\n{EDIT_CODE}```\n\n"
        f"The same code, with the method `flush` renamed to `drain_{i}`:\n```python\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"server exited early; see {log}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"server at {url} not ready after {timeout} s; see {log}")


def start_llama_server(args, work: Path, slots: int) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    log = work / "llama-server.log"
    cmd = [
        args.llama_server, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
        "-np", str(slots), "-c", str(args.n_ctx * slots), "-b", str(args.n_batch), "-ub", str(min(args.n_batch, 512)),
        "-ngl", str(args.n_gpu_layers if args.n_gpu_layers >= 0 else 999), "-fa", "auto",
        "--kv-unified" if args.kv_unified else "--no-kv-unified", "--no-webui", *args.llama_server_arg,
    ]  # fmt: skip
    if args.threads:
        cmd += ["-t", str(args.threads)]
    if args.draft_model:  # greedy drafts, as Minerva's; llama-server's own default would be 3 a step
        # Its draft sampling on the CPU, as Minerva's argmax. (A make_synthetic_llama.py pair from before its shifted
        # repeats has tied logits, which llama-server's draft top-k 10 and target top-k 40 break differently: it kept
        # 8% of its drafts, Minerva 77%. Regenerate such a pair.)
        cmd += ["--spec-type", "draft-simple", "--spec-draft-model", args.draft_model, "--spec-draft-n-max",
                str(args.draft_max), "--spec-draft-p-min", "0", "-ngld", "all",
                "--no-spec-draft-backend-sampling"]  # fmt: skip
    if _cpu_has_amx():
        cmd += ["--no-repack"]  # as Minerva does there: llama.cpp's AMX weight kernels crash on multi-token batches
    process = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}/health", process, log)
    return process, f"http://127.0.0.1:{port}/v1", Path(args.model).stem


def _cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def start_minerva(args, work: Path, slots: int, extra_env: dict | None = None) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    models = work / "models"
    models.mkdir()
    for path in filter(None, (args.model, args.draft_model)):
        (models / Path(path).name).symlink_to(Path(path).resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERVA_")}
    env.update(
        MINERVA_DATA_DIR=str(work / "minerva"),
        MINERVA_MODELS_DIR=str(models),
        MINERVA_PARALLEL=str(slots),
        MINERVA_N_CTX=str(args.n_ctx),
        MINERVA_N_BATCH=str(args.n_batch),
        MINERVA_N_GPU_LAYERS=str(args.n_gpu_layers),
        MINERVA_MAX_QUEUE="0",
        MINERVA_LOG_LEVEL="WARNING",
        MINERVA_PRELOAD=Path(args.model).stem,  # loaded as the worker starts, as llama-server loads before it answers
        **(extra_env or {}),
    )
    if args.threads:
        env["MINERVA_N_THREADS"] = str(args.threads)
    python = sys.executable
    files = [Path(p).resolve() for p in filter(None, (args.model, args.draft_model))]
    env["MINERVA_MODEL_ROOTS"] = ":".join(str(f.parent) for f in files)  # the symlinks' targets must be allowed
    commands = [["migrate", "--noinput"], ["models", "scan"]]
    if args.draft_model:  # what the admin's draft model field does
        env["MINERVA_SPECULATIVE_DRAFT"] = str(args.draft_max)
        set_draft = (
            "from models_app.models import LanguageModel as M; "
            f"M.objects.filter(name={Path(args.model).stem!r}).update(draft_model=M.objects.get(name={Path(args.draft_model).stem!r}))"
        )
        commands.append(["shell", "-c", set_draft])
    for command in commands:
        subprocess.run([python, "manage.py", *command], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    log = work / "minerva.log"
    process = subprocess.Popen(
        [python, "manage.py", "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/ready", process, log)  # 200 once the preloaded model is loaded
    return process, f"http://127.0.0.1:{port}/v1", Path(args.model).stem


# Sampling of the load: random text of a fixed length, EOS suppressed, no seed (as interactive clients send; a seeded
# request waits one more step for its first token, so that it repeats itself); --edit: greedy, until the block ends.
SAMPLING = {"ignore_eos": True, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05}
EDIT_SAMPLING = {"temperature": 0, "stop": ["```"]}


async def one_request(client, base_url: str, model: str, i: int, max_tokens: int, system: str, user: str,
                      sampling: dict = SAMPLING, edit: bool = False) -> dict:  # fmt: skip
    messages = [{"role": "system", "content": system}] if system else []
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling,
    }
    if edit:  # a plain completion: /v1/completions
        body["prompt"] = user
    else:
        body["messages"] = [*messages, {"role": "user", "content": user}]
    started = time.perf_counter()
    stamps, tokens, accepted = [], None, None
    endpoint = "completions" if edit else "chat/completions"
    async with client.stream("POST", f"{base_url}/{endpoint}", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{base_url}: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                details = chunk["usage"].get("completion_tokens_details") or {}
                accepted = details.get("accepted_prediction_tokens", accepted)
            if "draft_n_accepted" in (chunk.get("timings") or {}):  # llama-server's
                accepted = chunk["timings"]["draft_n_accepted"]
            for choice in chunk.get("choices") or []:
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    return {
        "ttft": stamps[0] - started if stamps else None,
        "itl": [b - a for a, b in itertools.pairwise(stamps)],
        "tokens": tokens if tokens is not None else len(stamps),
        "accepted": accepted,
        "end": time.perf_counter(),
        "start": started,
    }


async def run_level(base_url: str, model: str, concurrency: int, n_requests: int, max_tokens: int, offset: int,
                    shared_words: int = 0, prompt_words: int = 80, conversations: int = 0,
                    edit: bool = False):  # fmt: skip
    # --shared-prefix: one system prompt for every request of the level (new for each level, so no server has it
    # cached beforehand): agents of one team starting together.
    system = f"Session {offset}. " + prompt(offset, shared_words) if shared_words else ""

    def user(i: int) -> str:
        # --conversations K: request i continues conversation i % K (its long prompt, then a turn of its own), so
        # with more conversations than slots an agent comes back after others took its slot.
        if conversations:
            return prompt(offset + (i - offset) % conversations, prompt_words) + f" Turn {i}."
        return edit_prompt(i) if edit else prompt(i, prompt_words)

    # A fresh connection per request: llama-server closes streamed responses, which confuses pooled reuse.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        queue = list(range(offset, offset + n_requests))
        results = []

        async def worker():
            while queue:
                i = queue.pop(0)
                sampling = EDIT_SAMPLING if edit else SAMPLING
                results.append(await one_request(client, base_url, model, i, max_tokens, system, user(i), sampling,
                                                 edit))  # fmt: skip

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ttfts = [r["ttft"] * 1000 for r in results if r["ttft"] is not None]
    itls = [x * 1000 for r in results for x in r["itl"]]
    total = sum(r["tokens"] for r in results)
    return {
        "requests": n_requests,
        "tokens": total,
        "seconds": round(elapsed, 3),
        "tok_s": round(total / elapsed, 1),
        "ttft_p50_ms": round(pct(ttfts, 50), 1),
        "ttft_p95_ms": round(pct(ttfts, 95), 1),
        "itl_p50_ms": round(pct(itls, 50), 2),
        "itl_p95_ms": round(pct(itls, 95), 2),
    } | ({"accepted_drafts": sum(r["accepted"] or 0 for r in results)} if any(r["accepted"] for r in results) else {})


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(p) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of the llama-server binary")
    parser.add_argument("--model", required=True, help="GGUF file both servers load")
    parser.add_argument("--levels", default="1,4", help="concurrency levels, e.g. 1,4,16,64")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default 2 x level, min 4)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--n-ctx", type=int, default=1024, help="context per slot")
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--shared-prefix",
        type=int,
        default=0,
        help="words of a system prompt every request of a level shares (~1.3 tokens a word)",
    )
    parser.add_argument("--prompt-words", type=int, default=80, help="words of each request's own prompt")
    parser.add_argument(
        "--conversations",
        type=int,
        default=0,
        help="requests continue this many conversations in turn (0: every prompt new)",
    )
    parser.add_argument(
        "--edit",
        action="store_true",
        help="each request (a /v1/completions prompt) has the model write a code block again with one name changed, "
        "greedy, until the block ends (drafting: --minerva-env MINERVA_SPECULATIVE_DRAFT=8 "
        "--llama-server-arg=--spec-type --llama-server-arg=ngram-simple)",
    )
    parser.add_argument(
        "--kv-unified",
        action="store_true",
        help="one KV cache shared by the slots on both servers (default: one per slot)",
    )
    parser.add_argument(
        "--draft-model",
        help="a GGUF with the model's tokenizer that drafts for it on both servers (Minerva's draft_model, "
        "llama-server's --spec-draft-model), greedily, up to --draft-max tokens a step",
    )
    parser.add_argument("--draft-max", type=int, default=8)
    parser.add_argument("--minerva-env", action="append", default=[], help="NAME=VALUE for Minerva (repeatable)")
    parser.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        help="one more argument for llama-server (repeatable, one word each: --llama-server-arg=--cache-ram "
        "--llama-server-arg=0)",
    )
    parser.add_argument(
        "--paired",
        type=int,
        default=0,
        help="then N single requests to each server in turn (the order alternating), for one client's time to the "
        "first token: the median of the N differences (a VM's drift between two levels cancels out)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    slots = max(levels)

    work = Path(tempfile.mkdtemp(prefix="minerva-bench-"))
    servers = {}
    try:
        # The first request, sent as soon as the server says it is ready (llama-server's /health, Minerva's /ready,
        # both once the model is loaded): is anything still cold?
        first = {}
        started = time.perf_counter()
        servers["llama-server"] = start_llama_server(args, work, slots)
        first["llama-server"] = _first_request(servers["llama-server"], started, args.edit)
        minerva_env = {"MINERVA_SHARED_CONTEXT": "on" if args.kv_unified else "off"}
        minerva_env.update(e.split("=", 1) for e in args.minerva_env)
        started = time.perf_counter()
        servers["minerva"] = start_minerva(args, work, slots, minerva_env)
        first["minerva"] = _first_request(servers["minerva"], started, args.edit)
        for name, numbers in first.items():
            print(f"  {name:12} first request: {numbers}", flush=True)
        for _process, url, model in servers.values():  # warm-up: load, first graph, caches
            asyncio.run(run_level(url, model, 1, 2, 16, offset=10_000, edit=args.edit))
        results = {name: {} for name in servers} | {"first_request": first}
        offset = 0
        for level in levels:
            n = args.requests or max(4, 2 * level)
            for name, (_process, url, model) in servers.items():
                workload = (args.shared_prefix, args.prompt_words, args.conversations, args.edit)
                results[name][level] = asyncio.run(run_level(url, model, level, n, args.max_tokens, offset, *workload))
                print(f"  {name:12} c={level:<3} {results[name][level]}", flush=True)
            offset += n
        if args.paired:
            results["paired"] = paired_ttft(servers, args, offset)
    finally:
        for process, _url, _model in servers.values():
            process.send_signal(signal.SIGTERM)
        for process, _url, _model in servers.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    report(results, levels, args)
    shutil.rmtree(work, ignore_errors=True)


def paired_ttft(servers: dict, args, offset: int) -> dict:
    """--paired: one request at a time, to each server in turn; TTFT per server and the paired differences."""
    ttft = {name: [] for name in servers}
    for i in range(args.paired):
        names = list(servers) if i % 2 == 0 else list(reversed(servers))
        for name in names:
            _process, url, model = servers[name]
            one = run_level(url, model, 1, 1, args.max_tokens, offset + i, prompt_words=args.prompt_words)
            level = asyncio.run(one)
            ttft[name].append(level["ttft_p50_ms"])
    diffs = sorted(m - ls for m, ls in zip(ttft["minerva"], ttft["llama-server"], strict=True))
    paired = {
        "requests": args.paired,
        **{f"{name}_ttft_p50_ms": round(statistics.median(v), 1) for name, v in ttft.items()},
        "minerva_minus_llama_server_ms": {"p25": round(pct(diffs, 25), 1), "p50": round(statistics.median(diffs), 1),
                                          "p75": round(pct(diffs, 75), 1)},
    }  # fmt: skip
    print(f"  paired TTFT, one request at a time: {paired}", flush=True)
    return paired


def _first_request(server: tuple, started: float, edit: bool = False) -> dict:
    """One request right after the server said it is ready: seconds from starting the server until then, and
    the request's time to first token (a model still loading shows here)."""
    _process, url, model = server
    answered = time.perf_counter() - started
    level = asyncio.run(run_level(url, model, 1, 1, 16, offset=20_000, edit=edit))
    return {"ready_after_s": round(answered, 2), "ttft_ms": level["ttft_p50_ms"]}


def report(results: dict, levels: list[int], args) -> None:
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\nmodel {Path(args.model).name}, {args.max_tokens} output tokens, ctx {args.n_ctx}/slot, {machine}")
    header = "| c | server | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |"
    print(header + "\n|---|---|---|---|---|---|---|")
    for level in levels:
        for name in ("llama-server", "minerva"):
            r = results[name][level]
            cells = [r["tok_s"], r["ttft_p50_ms"], r["ttft_p95_ms"], r["itl_p50_ms"], r["itl_p95_ms"]]
            print(f"| {level} | {name} | " + " | ".join(str(c) for c in cells) + " |")
        m, b = results["minerva"][level], results["llama-server"][level]
        ratios = [m[k] / b[k] for k in ("tok_s", "ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms")]
        print(f"| {level} | **ratio** | **{ratios[0]:.2f}x** | " + " | ".join(f"{x:.2f}x" for x in ratios[1:]) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
