"""Pulling models from the Hugging Face Hub into MINERVA_MODELS_DIR/hf.co/<owner>/<repo>/.

`model_pull` does the work anywhere (the CLI calls it in-process). From the API a pull is a Celery task on its own
queue: `pull_start` starts it, or joins the one already running for the same ref (a Redis lock), and the task
publishes Ollama's progress lines on a Redis Stream that every watcher reads from its start (`pull_lines`)."""

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from celery import current_app
from django.conf import settings
from filelock import FileLock
from redis.exceptions import RedisError

from core.redis import get_async_redis, get_redis

from . import hub
from .hub import HubError, Ref
from .models import LanguageModel
from .services import RegistryError, model_register

logger = logging.getLogger(__name__)

PULL_QUEUE = "minerva.pull"
STREAM_KEY = "minerva:pull:{}"  # the pull's progress lines, {"line": json}
LOCK_KEY = "minerva:pull:{}:lock"  # held while the pull is queued or running; gone = nobody is pulling
LOCK_SECONDS = 60  # refreshed by every progress line; a dead worker's pull is free again after this
# A queued pull waits for the worker's pull thread, maybe behind another download: its lock lasts while its
# message can still run (a day), so a request for it meanwhile joins it instead of queueing a second one.
QUEUED_SECONDS = 86400
STREAM_SECONDS = 3600  # a finished pull's lines stay readable this long
PROGRESS_EVERY = 0.25  # seconds between two progress lines of one file (each chunk is 10 MiB)

Line = dict  # one of Ollama's progress lines: {"status": ...}, with digest/total/completed while pulling


def pulled_dir(repo: str) -> Path:
    """Where a repository's files go: a folder per repository, so equal file names of two repos never meet."""
    owner, name = repo.split("/", 1)
    return Path(settings.MODELS_DIR) / "hf.co" / owner / name


def model_pull(*, ref: str | Ref, progress: Callable[[Line], None] | None = None) -> LanguageModel:
    """Resolve `ref` on the Hub, check the disk, download every file (resuming), verify each sha256 and register
    the model as `hf.co/owner/repo:QUANT` (Ollama's name for it), with `owner/repo:QUANT` as an alias (and the
    bare repo, when no quant was asked for)."""
    ref = ref if isinstance(ref, Ref) else Ref.parse(ref)
    emit = progress or (lambda line: None)
    emit({"status": "pulling manifest"})
    resolved = hub.resolve(ref)
    repo = resolved.repo
    folder = pulled_dir(repo)
    folder.mkdir(parents=True, exist_ok=True)
    # One pull per folder at a time, across processes (the CLI beside a worker): the second waits, then finds
    # the files complete and only verifies them.
    with FileLock(str(folder / ".pull.lock")):
        hub.space_check(resolved, folder)
        last = {"at": 0.0}

        def on_bytes(file: hub.HubFile, completed: int) -> None:
            now = time.monotonic()
            if completed >= file.size or now - last["at"] >= PROGRESS_EVERY:
                last["at"] = now
                emit({"status": f"pulling {file.sha256[:12]}", "digest": file.digest, "total": file.size,
                      "completed": completed})  # fmt: skip

        for file in resolved.files:
            hub.fetch(resolved, file, folder / Path(file.name).name, progress=on_bytes)
        emit({"status": "verifying sha256 digest"})
        for file in resolved.files:
            hub.verify(file, folder / Path(file.name).name)
    emit({"status": "writing manifest"})
    quant = resolved.quant or Path(resolved.files[0].name).stem
    aliases = [f"{repo}:{quant}"] + ([repo, f"hf.co/{repo}"] if not ref.selector else [])
    first = folder / Path(resolved.files[0].name).name
    model = model_register(name=f"hf.co/{repo}:{quant}", path=first, aliases=aliases)
    emit({"status": "success"})
    return model


# ------------------------------------------------------------------------------------- through Celery


def pull_key(ref: Ref) -> str:
    """One pull per (mirror, repo, quant or file, revision): a second request for it joins the first."""
    ident = "\0".join([hub.endpoint(), ref.repo.lower(), ref.selector.lower(), ref.revision])
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def pull_start(*, ref: str) -> str:
    """Queue a pull of `ref` on the pull queue, unless one is already queued or running; its key either way."""
    parsed = Ref.parse(ref)
    key = pull_key(parsed)
    redis = get_redis()
    if redis.set(LOCK_KEY.format(key), "queued", nx=True, ex=QUEUED_SECONDS):
        redis.delete(STREAM_KEY.format(key))  # an earlier pull's lines
        current_app.tasks["minerva.pull_model"].apply_async(args=[key, str(parsed)], queue=PULL_QUEUE)
    return key


def pull_run(*, key: str, ref: str) -> None:
    """The pull task's body: run `model_pull`, publishing each line (and ending with `success` or an error line
    carrying its HTTP status); the lock is refreshed with every line and dropped at the end."""
    redis = get_redis()
    stream, lock = STREAM_KEY.format(key), LOCK_KEY.format(key)

    def publish(line: Line) -> None:
        pipe = redis.pipeline()
        pipe.xadd(stream, {"line": json.dumps(line)}, maxlen=10_000, approximate=True)
        pipe.expire(stream, STREAM_SECONDS)
        pipe.set(lock, "running", ex=LOCK_SECONDS)
        pipe.execute()

    try:
        model_pull(ref=ref, progress=publish)
    except HubError as exc:
        publish({"error": exc.message, "status_code": exc.status})
    except RegistryError as exc:
        publish({"error": f"the files are here but could not be registered: {exc}", "status_code": 422})
    except Exception as exc:
        logger.exception("pulling %s failed", ref)
        publish({"error": f"pulling {ref} failed: {exc}", "status_code": 500})
    finally:
        try:
            redis.delete(lock)
        except RedisError:
            logger.warning("cannot release the pull lock of %s", ref, exc_info=True)


def pull_state(key: str) -> dict | None:
    """The pull's latest line and whether it has ended (for pages and JSON that poll); None for an unknown key."""
    redis = get_redis()
    last = redis.xrevrange(STREAM_KEY.format(key), count=1)
    running = bool(redis.exists(LOCK_KEY.format(key)))
    if not last and not running:
        return None
    line = json.loads(last[0][1]["line"]) if last else {"status": "queued"}
    done = line.get("status") == "success" or "error" in line
    if not running and not done:
        line = {"error": "the pull stopped before it finished (its worker went away); pull again to resume",
                "status_code": 500}  # fmt: skip
        done = True
    return {"id": key, **line, "done": done}


async def pull_lines(key: str, *, first_timeout: float) -> AsyncIterator[Line]:
    """Every line of the pull from its start, as they come, until `success` or an error line. If its lock goes
    away with no ending line (the worker died), or no line comes within `first_timeout` (no worker consumes
    the pull queue), an error line ends it."""
    redis = get_async_redis()
    stream, lock = STREAM_KEY.format(key), LOCK_KEY.format(key)
    last_id, started = "0", time.monotonic()
    try:
        while True:
            batches = await redis.xread({stream: last_id}, block=1000, count=100)
            for _, entries in batches:
                for entry_id, fields in entries:
                    last_id = entry_id
                    line = json.loads(fields["line"])
                    yield line
                    if line.get("status") == "success" or "error" in line:
                        return
            if batches:
                continue
            if last_id == "0" and time.monotonic() - started > first_timeout:
                yield {"error": "no worker has taken the pull yet (is `manage.py serve` running, or another pull "
                       "ahead of it?); it stays queued", "status_code": 503}  # fmt: skip
                return
            # The lock gone and still no ending line (the last lines may come just before it goes): a dead worker.
            if not await redis.exists(lock) and not await redis.xread({stream: last_id}, count=1):
                yield {"error": "the pull stopped before it finished (its worker went away); pull again to resume",
                       "status_code": 500}  # fmt: skip
                return
    finally:
        await redis.aclose()
