"""Metrics shared by every process: counters and histogram buckets live in Redis hashes (HINCRBY), written
where a request's log row is finished and read by /metrics. Redis rather than prometheus-client's multiprocess
mode because that mode needs one shared directory, so it cannot count across hosts; we already share Redis."""

import json
import os
import socket
import time

from .models import RequestLog

REQUESTS = "minerva:metrics:requests"  # "endpoint|model|status" -> count
TOKENS = "minerva:metrics:tokens"  # "model|prompt" / "model|completion" -> count
HISTOGRAMS = {"ttft": "minerva:metrics:ttft", "itl": "minerva:metrics:itl"}  # "model|le" -> count, plus sum/count
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
WORKERS = "minerva:workers"  # hostname -> {"at": unix time, "queues": [...]}
WORKER_BEAT_SECONDS = 5
WORKER_FRESH_SECONDS = 15


def metrics_record(log: RequestLog) -> None:
    """Count one finished request: its status, tokens and latencies."""
    from minerva_project.redis import get_redis

    pipe = get_redis().pipeline(transaction=False)
    pipe.hincrby(REQUESTS, f"{log.endpoint}|{log.model}|{log.status_code}", 1)
    if log.prompt_tokens or log.completion_tokens:
        pipe.hincrby(TOKENS, f"{log.model}|prompt", log.prompt_tokens)
        pipe.hincrby(TOKENS, f"{log.model}|completion", log.completion_tokens)
    if log.ttft_ms is not None:
        _observe(pipe, "ttft", log.model, log.ttft_ms / 1000)
        if log.latency_ms is not None and log.completion_tokens > 1:
            _observe(pipe, "itl", log.model, (log.latency_ms - log.ttft_ms) / 1000 / (log.completion_tokens - 1))
    pipe.execute()


def _observe(pipe, name: str, model: str, seconds: float) -> None:
    key = HISTOGRAMS[name]
    for bound in BUCKETS:
        if seconds <= bound:
            pipe.hincrby(key, f"{model}|{bound}", 1)
    pipe.hincrby(key, f"{model}|+Inf", 1)
    pipe.hincrbyfloat(key, f"{model}|sum", max(seconds, 0.0))


def worker_beat(queues: list[str]) -> None:
    """Tell /ready and /metrics that this worker process is alive and which queues it consumes."""
    from minerva_project.redis import get_redis

    name = f"{socket.gethostname()}:{os.getpid()}"
    get_redis().hset(WORKERS, name, json.dumps({"at": time.time(), "queues": queues}))


def workers_alive() -> list[dict]:
    """Workers that sent a heartbeat recently."""
    from minerva_project.redis import get_redis

    now = time.time()
    reports = [json.loads(r) for r in get_redis().hvals(WORKERS)]
    return [r for r in reports if now - r["at"] < WORKER_FRESH_SECONDS]
