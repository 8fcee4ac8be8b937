"""Metrics shared by every process: counters and histogram buckets live in Redis hashes (HINCRBY), written
where a request's log row is finished and read by /metrics. Redis rather than prometheus-client's multiprocess
mode because that mode needs one shared directory, so it cannot count across hosts; we already share Redis."""

from .models import RequestLog

REQUESTS = "minerva:metrics:requests"  # "endpoint|model|status" -> count
TOKENS = "minerva:metrics:tokens"  # "model|prompt" / "completion" / "drafted" / "draft_accepted" -> count
HISTOGRAMS = {"ttft": "minerva:metrics:ttft", "itl": "minerva:metrics:itl"}  # "model|le" -> count, plus sum/count
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


UNKNOWN_MODEL = "unknown"  # the label of every model name that is not registered


def metrics_record(log: RequestLog, *, endpoint: str | None = None, model: str | None = None) -> None:
    """Count one finished request: its status, tokens and latencies. Labels are the route and a registered
    model's name (`endpoint`, `model`, when the row's own could be anything a caller sent): every label value
    is a series kept forever, so none may come from a caller unchecked."""
    from core.redis import get_redis

    endpoint = endpoint or log.endpoint
    model = log.model if model is None else model
    pipe = get_redis().pipeline(transaction=False)
    pipe.hincrby(REQUESTS, f"{endpoint}|{model}|{log.status_code}", 1)
    if log.prompt_tokens or log.completion_tokens:
        pipe.hincrby(TOKENS, f"{model}|prompt", log.prompt_tokens)
        pipe.hincrby(TOKENS, f"{model}|completion", log.completion_tokens)
    if drafted := getattr(log, "drafted_tokens", 0):  # speculative decoding (set by the worker, not a column)
        pipe.hincrby(TOKENS, f"{model}|drafted", drafted)
        pipe.hincrby(TOKENS, f"{model}|draft_accepted", log.accepted_draft_tokens)
    if log.ttft_ms is not None:
        _observe(pipe, "ttft", model, log.ttft_ms / 1000)
        if log.latency_ms is not None and log.completion_tokens > 1:
            _observe(pipe, "itl", model, (log.latency_ms - log.ttft_ms) / 1000 / (log.completion_tokens - 1))
    pipe.execute()


def metrics_model_label(name: str) -> str:
    """A requested model name as a label: the registered model it names (aliases too), else `unknown`."""
    from django.db.models import Q

    from models_app.models import LanguageModel

    if not name:
        return ""
    if "\x00" in name:  # PostgreSQL refuses NUL in text; no model is called that
        return UNKNOWN_MODEL
    found = LanguageModel.objects.filter(Q(name=name) | Q(aliases__name=name)).values_list("name", flat=True).first()
    return found or UNKNOWN_MODEL


def _observe(pipe, name: str, model: str, seconds: float) -> None:
    key = HISTOGRAMS[name]
    for bound in BUCKETS:
        if seconds <= bound:
            pipe.hincrby(key, f"{model}|{bound}", 1)
    pipe.hincrby(key, f"{model}|+Inf", 1)
    pipe.hincrbyfloat(key, f"{model}|sum", max(seconds, 0.0))
