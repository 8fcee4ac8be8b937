"""The cluster as the registry of workers (core.workers) shows it: which hosts serve which models, and whether a
request for a model can be served at all. Read by views, /ready, /metrics, the admin and the status page."""

import time

from celery import current_app

from core.errors import NoWorker
from core.redis import get_redis
from core.workers import STARTUP_GRACE_SECONDS, worker_records, workers_list, workers_recent
from models_app.models import LanguageModel

_STARTED = time.monotonic()


def cluster_get() -> dict:
    """A snapshot of the cluster: every announced worker (alive or not yet forgotten) and, per enabled model, the
    live workers that have its file, those that hold it loaded, its queue depth and whether it is routable."""
    records = worker_records()
    live = [record for record, alive in records if alive]
    models = list(LanguageModel.objects.filter(enabled=True, available=True).values_list("name", flat=True))
    pipe = get_redis().pipeline(transaction=False)
    for name in models:
        pipe.llen(LanguageModel(name=name).queue)
    depths = pipe.execute() if models else []
    return {
        "workers": [
            {**record, "alive": alive, "held": len(record.get("held", []))}
            for record, alive in sorted(records, key=lambda r: r[0]["id"])
        ],
        "hosts": sorted({record["host"] for record in live}),
        "models": [
            {
                "name": name,
                "workers": [w["id"] for w in live if name in w.get("models", {})],
                "hashes": sorted({w["models"][name]["hash"] for w in live if name in w.get("models", {})}),
                "loaded_on": [w["id"] for w in live if any(m["name"] == name for m in w.get("loaded", []))],
                "queued": depth,
                "routable": any(name in w.get("models", {}) for w in live),
            }
            for name, depth in zip(models, depths, strict=True)
        ],
        "slots": {
            "total": sum(w.get("slots", {}).get("total", 0) for w in live),
            "busy": sum(w.get("slots", {}).get("busy", 0) for w in live),
        },
    }


def model_servable_check(model: LanguageModel) -> None:
    """Refuse at once (503 `model_unavailable`, Retry-After) a request that no live worker can serve, rather than
    leave it in a queue nobody reads: some workers are alive and none has the model's file, or none is alive and
    none beat within the start-up grace. Right after a start (this process's, or a worker's last beat within the
    grace) an empty registry is a worker still starting, and the request is queued."""
    if current_app.conf.task_always_eager:  # tasks run in this process: there are no workers to ask
        return
    workers = workers_list()
    if any(model.name in w.get("models", {}) for w in workers):
        return
    if workers:
        raise NoWorker(f"No running worker has the model {model.name}; try again later or on another server.")
    if workers_recent() or time.monotonic() - _STARTED < STARTUP_GRACE_SECONDS:
        return
    raise NoWorker(f"No worker is running for the model {model.name}; try again later.")
