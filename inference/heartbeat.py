"""A worker's identity and liveness in Redis: its id, the key its heartbeat refreshes, and whether another worker
is alive. Read by views (a dead worker's request ends at once), by reapers and by `serve`; written by worker.py."""

import os
import socket

from core.redis import get_redis

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
WORKER_TTL_SECONDS = 3  # a worker whose key is gone has been dead (or frozen) for this long


def worker_key(worker_id: str) -> str:
    return f"minerva:worker:{worker_id}"


def worker_alive(worker_id: str) -> bool:
    """Whether that worker's heartbeat is fresh (this process always is, even while Redis restarts)."""
    return worker_id == WORKER_ID or bool(get_redis().exists(worker_key(worker_id)))
