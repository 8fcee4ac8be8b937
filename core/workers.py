"""The worker registry: each Celery worker process announces itself with one heartbeat in Redis (its host, the
models it can serve and has loaded, slots, memory, backend) and every process reads the cluster from there.

One beat writes two keys in one round trip: the record, a field of the hash `minerva:workers` (kept after the
worker dies, so a survivor can put back the messages it held), and `minerva:worker:<id>`, whose 3 s TTL is the
liveness every reader trusts (Redis's clock, not the hosts')."""

import json
import os
import socket
import time

from .redis import get_redis

HOST = os.environ.get("MINERVA_NODE_NAME") or socket.gethostname()
WORKER_ID = f"{HOST}:{os.getpid()}"
WORKER_TTL_SECONDS = 3  # a worker whose key is gone has been dead (or cut off) for this long
WORKERS_KEY = "minerva:workers"  # hash: worker id -> its record (JSON)
RECENT_KEY = "minerva:workers:recent"  # exists while some worker beat within STARTUP_GRACE_SECONDS
# A request is queued, not refused, while no worker is alive but one beat this recently (a worker restarting) or
# this process started this recently (`make run`: daphne answers before the worker's first beat).
STARTUP_GRACE_SECONDS = 60


def worker_key(worker_id: str) -> str:
    return f"minerva:worker:{worker_id}"


def worker_alive(worker_id: str) -> bool:
    """Whether that worker's heartbeat is fresh (this process always is, even while Redis restarts)."""
    return worker_id == WORKER_ID or bool(get_redis().exists(worker_key(worker_id)))


def worker_announce(record: dict) -> None:
    """Beat: write this worker's record and refresh its liveness, in one round trip."""
    record = {**record, "id": WORKER_ID, "host": HOST, "pid": os.getpid(), "at": time.time()}
    pipe = get_redis().pipeline(transaction=False)
    pipe.hset(WORKERS_KEY, WORKER_ID, json.dumps(record))
    pipe.set(worker_key(WORKER_ID), "1", ex=WORKER_TTL_SECONDS)
    pipe.set(RECENT_KEY, WORKER_ID, ex=STARTUP_GRACE_SECONDS)
    pipe.execute()


def worker_records() -> list[tuple[dict, bool]]:
    """Every announced worker's last record, with whether it is alive."""
    redis = get_redis()
    records = [json.loads(value) for value in redis.hvals(WORKERS_KEY)]
    if not records:
        return []
    pipe = redis.pipeline(transaction=False)
    for record in records:
        pipe.exists(worker_key(record["id"]))
    return list(zip(records, [bool(alive) for alive in pipe.execute()], strict=True))


def workers_list() -> list[dict]:
    """The live workers' records."""
    return [record for record, alive in worker_records() if alive]


def worker_dead(worker_id: str) -> None:
    """Mark a worker dead at once (its supervisor saw it exit): views stop waiting for it."""
    get_redis().delete(worker_key(worker_id))


def worker_forget(worker_id: str) -> bool:
    """Drop a dead worker's record (after its messages were put back); True for the one caller that did."""
    return bool(get_redis().hdel(WORKERS_KEY, worker_id))


def workers_recent() -> bool:
    """Whether any worker beat within STARTUP_GRACE_SECONDS."""
    return bool(get_redis().exists(RECENT_KEY))
