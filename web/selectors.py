"""What the status and models pages show, read in one place: `status_snapshot()`. The pages never read Redis keys,
worker reports or metrics hashes themselves, so the worker registry can change underneath without touching them."""

import datetime
import math
import time

from django.db.models import Count, Sum
from django.utils import timezone
from redis.exceptions import RedisError

from batches.models import Batch
from batches.services import batch_counts
from core.redis import get_redis
from core.workers import workers_list
from inference import metrics
from inference.models import RequestLog
from models_app.models import LanguageModel
from models_app.selectors import model_loaded_list, model_n_ctx, model_parallel

PERCENTILES = (0.5, 0.9, 0.99)
RECENT_REQUESTS = 20
RECENT_BATCHES = 10


def status_snapshot(*, recent: bool = True) -> dict:
    """Models, workers, queues, rates, latency percentiles and (with `recent`) the latest requests and batches."""
    now = time.time()
    loaded = {}
    for entry in model_loaded_list():
        if not entry.get("embedding") or entry["name"] not in loaded:  # a model's generating context first
            loaded[entry["name"]] = entry
    models = list(LanguageModel.objects.all())
    running = dict(
        RequestLog.objects.filter(status=RequestLog.Status.RUNNING).values_list("model").annotate(n=Count("id"))
    )
    try:
        depths, workers = _queue_depths(models), workers_list()
    except RedisError:  # the page still shows the database's view while Redis restarts
        depths, workers = {}, []
    snapshot = {
        "at": now,
        "models": [
            _model(m, loaded.get(m.name), running.get(m.name, 0), depths.get(m.name), now)
            | {"loading": _loading(m.name, workers)}
            for m in models
        ],
        "workers": [
            {
                "id": w["id"],
                "host": w["host"],
                "queues": w.get("queues", []),
                "slots": w.get("slots"),
                "seen_seconds_ago": round(now - w["at"], 1),
            }
            for w in workers
        ],
        "rates": _rates(),
        "latency": _latency(),
    }
    if recent:
        snapshot["requests"] = [_request(r) for r in RequestLog.objects.order_by("-created")[:RECENT_REQUESTS]]
        snapshot["batches"] = [_batch(b) for b in Batch.objects.order_by("-created")[:RECENT_BATCHES]]
    return snapshot


def _model(model: LanguageModel, loaded: dict | None, running: int, depth: int | None, now: float) -> dict:
    slots = loaded["slots"] if loaded else model_parallel(model)
    busy = loaded["busy_slots"] if loaded else running
    expires = loaded["expires_at"] if loaded else None
    return {
        "name": model.name,
        "enabled": model.enabled,
        "available": model.available,
        "loaded": loaded is not None,
        "format": model.format,
        "quantization": model.quantization,
        "parameters": model.metadata.get("parameter_count") or 0,
        "architecture": model.metadata.get("architecture", ""),
        "file_size": model.file_size,
        "context_length": model.context_length,
        "n_ctx": model_n_ctx(model),
        "slots": slots,
        "slots_busy": busy,
        "queue_depth": depth,
        # seconds until it unloads when idle; None: not loaded or never (keep_alive < 0)
        "expires_in": None if expires is None or math.isinf(expires) else max(0, round(expires - now)),
        "kept_forever": expires is not None and math.isinf(expires),
    }


def _loading(name: str, workers: list[dict]) -> float | None:
    """How far a worker is in loading the model's weights (0 to 1; 0 for one that will preload it), or None."""
    progress = [w["loading"][name] for w in workers if name in w.get("loading", {})]
    progress += [0.0 for w in workers if name in w.get("preloading", [])]
    return max(progress) if progress else None


def _queue_depths(models: list[LanguageModel]) -> dict[str, int]:
    pipe = get_redis().pipeline(transaction=False)
    for model in models:
        pipe.llen(model.queue)
    return dict(zip((m.name for m in models), pipe.execute(), strict=True))


def _rates() -> dict:
    """Requests and tokens over the last minute, from the request log."""
    since = timezone.now() - datetime.timedelta(minutes=1)
    totals = RequestLog.objects.filter(created__gte=since).aggregate(
        requests=Count("id"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens")
    )
    return {
        "requests_per_minute": totals["requests"],
        "prompt_tokens_per_minute": totals["prompt"] or 0,
        "completion_tokens_per_minute": totals["completion"] or 0,
    }


def _latency() -> dict:
    """TTFT and inter-token latency percentiles per model (seconds), from the shared histograms /metrics serves:
    each percentile is the upper bound of the bucket it falls in, as Prometheus' histogram_quantile rounds."""
    result: dict[str, dict] = {}
    try:
        hashes = {name: get_redis().hgetall(key) for name, key in metrics.HISTOGRAMS.items()}
    except RedisError:
        return result
    for name, values in hashes.items():
        per_model: dict[str, dict[str, float]] = {}
        for field, value in values.items():
            model, bound = field.rsplit("|", 1)
            per_model.setdefault(model, {})[bound] = float(value)
        for model, counts in per_model.items():
            total = counts.get("+Inf", 0)
            if not total:
                continue
            entry = {"count": int(total), "mean": round(counts.get("sum", 0.0) / total, 4)}
            for q in PERCENTILES:
                bound = next((b for b in metrics.BUCKETS if counts.get(str(b), 0) >= q * total), None)
                entry[f"p{round(q * 100)}"] = bound  # None: above the largest bucket
            result.setdefault(model, {})[name] = entry
    return result


def _request(row: RequestLog) -> dict:
    return {
        "request_id": row.request_id,
        "created": row.created.isoformat(),
        "endpoint": row.endpoint,
        "model": row.model,
        "status": row.status,
        "status_code": row.status_code,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "ttft_ms": row.ttft_ms,
        "latency_ms": row.latency_ms,
        "api_key_prefix": row.api_key_prefix,
    }


def _batch(batch: Batch) -> dict:
    return {"id": batch.id, "status": batch.status, "model": batch.model, "created": batch.created.isoformat(),
            "request_counts": batch_counts(batch)}  # fmt: skip
