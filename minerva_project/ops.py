"""Probes for operators: /health, /ready, /metrics. They live in the project, not in an app, because each
looks across all of them (database, Redis, workers, the model registry) and none belongs to the OpenAI surface."""

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from redis.exceptions import RedisError

from access.services import staff_key_check
from api.decorators import error_response
from core.errors import MinervaError
from core.redis import get_redis
from core.workers import workers_list
from inference import metrics
from inference.models import RequestLog
from models_app.models import LanguageModel
from models_app.selectors import model_loaded_names


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def ready(request: HttpRequest) -> HttpResponse:
    missing = []
    queues = set()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        queues = {m.queue for m in LanguageModel.objects.filter(enabled=True, available=True)}
    except Exception as exc:  # any driver error means the same thing here: not ready
        missing.append(f"database: {exc.__class__.__name__}")
    workers: list[dict] = []
    try:
        get_redis().ping()
        workers = workers_list()
        if not any(queues & set(w.get("queues", [])) for w in workers):
            missing.append("worker: none alive for an enabled model")
        loading = sorted({name for w in workers for name in w.get("preloading", [])})
        if loading:
            missing.append(f"models: still loading {', '.join(loading)}")
    except RedisError as exc:
        missing.append(f"redis: {exc.__class__.__name__}")
    cluster = {"workers": len(workers), "hosts": sorted({w["host"] for w in workers})}
    if missing:
        return JsonResponse({"status": "unavailable", "missing": missing, "cluster": cluster}, status=503)
    return JsonResponse({"status": "ready", "cluster": cluster})


def prometheus(request: HttpRequest) -> HttpResponse:
    try:
        staff_key_check(request.headers.get("Authorization", ""))
    except MinervaError as exc:
        return error_response(exc)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return HttpResponse(generate_latest(registry), content_type="text/plain; version=0.0.4; charset=utf-8")


class _Collector:
    """Reads the shared counters from Redis (and live state from Redis and the database) at scrape time."""

    def collect(self):
        redis = get_redis()
        requests = CounterMetricFamily("minerva_requests", "Requests answered", labels=["endpoint", "model", "status"])
        for field, count in redis.hgetall(metrics.REQUESTS).items():
            requests.add_metric(field.split("|"), int(count))
        yield requests
        tokens = CounterMetricFamily("minerva_tokens", "Tokens processed", labels=["model", "kind"])
        for field, count in redis.hgetall(metrics.TOKENS).items():
            tokens.add_metric(field.split("|"), int(count))
        yield tokens
        yield from self._histograms(redis)
        models = list(LanguageModel.objects.filter(enabled=True, available=True).values_list("name", flat=True))
        depth = GaugeMetricFamily("minerva_queue_depth", "Requests waiting per model", labels=["model"])
        lengths = redis.pipeline(transaction=False)
        for name in models:
            lengths.llen(LanguageModel(name=name).queue)
        for name, length in zip(models, lengths.execute(), strict=True):
            depth.add_metric([name], length)
        yield depth
        loaded = GaugeMetricFamily("minerva_model_loaded", "1 when some worker holds the model", labels=["model"])
        loaded_names = model_loaded_names()
        for name in models:
            loaded.add_metric([name], 1 if name in loaded_names else 0)
        yield loaded
        busy = GaugeMetricFamily("minerva_busy_slots", "Requests being generated now", labels=["model"])
        running = list(RequestLog.objects.filter(status=RequestLog.Status.RUNNING).values_list("model", flat=True))
        for name in models:
            busy.add_metric([name], sum(1 for m in running if m == name))
        yield busy
        workers = workers_list()
        yield GaugeMetricFamily("minerva_workers", "Worker processes alive", value=len(workers))
        hosts = GaugeMetricFamily("minerva_model_hosts", "Live workers that have the model's file", labels=["model"])
        for name in models:
            hosts.add_metric([name], sum(1 for w in workers if name in w.get("models", {})))
        yield hosts
        slots = GaugeMetricFamily("minerva_worker_slots", "Task slots per worker", labels=["worker", "host", "state"])
        for w in workers:
            total, busy = w.get("slots", {}).get("total", 0), w.get("slots", {}).get("busy", 0)
            slots.add_metric([w["id"], w["host"], "busy"], busy)
            slots.add_metric([w["id"], w["host"], "free"], max(total - busy, 0))
        yield slots

    def _histograms(self, redis):
        described = {"ttft": "Time to first token (seconds)", "itl": "Mean inter-token latency (seconds)"}
        for name, key in metrics.HISTOGRAMS.items():
            family = HistogramMetricFamily(f"minerva_{name}_seconds", described[name], labels=["model"])
            per_model: dict[str, dict[str, float]] = {}
            for field, value in redis.hgetall(key).items():
                model, bound = field.rsplit("|", 1)
                per_model.setdefault(model, {})[bound] = float(value)
            for model, values in per_model.items():
                buckets = [(str(b), values.get(str(b), 0.0)) for b in metrics.BUCKETS]
                buckets.append(("+Inf", values.get("+Inf", 0.0)))
                family.add_metric([model], buckets, sum_value=values.get("sum", 0.0))
            yield family
