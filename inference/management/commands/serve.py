"""`python manage.py serve`: start and supervise everything Minerva needs on one machine.

Children: an embedded redis-server (unless MINERVA_REDIS_URL is set), one Celery worker consuming the queue of
every enabled model whose file is here (none with --no-worker: an API host of a cluster, whose workers run
`manage.py worker`), and daphne (minerva_project/daphne.py: with a guard against bodies not worth reading).
A child that dies is restarted; SIGINT/SIGTERM stops them all within 10 s.
On Linux children also get PR_SET_PDEATHSIG, so even a SIGKILLed `serve` leaves no orphan behind."""

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from redis.exceptions import RedisError

from access.services import auth_required_without_override
from core.redis import get_redis, start_embedded_redis
from core.workers import HOST, worker_dead
from inference.services import DRAINING_KEY
from models_app.models import LanguageModel
from models_app.pulls import PULL_QUEUE
from models_app.selectors import model_parallel
from models_app.services import models_hosted, models_scan

# Stopping: the worker first (it gives running requests worker.DRAIN_SECONDS, then ends them with an error
# event that daphne still delivers), then daphne, then Redis: within 10 s in all.
WORKER_GRACE_SECONDS = 6
DAPHNE_GRACE_SECONDS = 3
RESTART_BACKOFF_SECONDS = 1.0


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGTERM us when `serve` dies.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_options() -> dict:
    """Children run in their own session, so a terminal's Ctrl-C reaches only `serve`, which then stops them in
    order (daphne and the worker before Redis). On Linux PR_SET_PDEATHSIG also covers a `serve` that is killed
    outright; other systems have no such call (there a SIGKILLed `serve` can leave its children running)."""
    if sys.platform.startswith("linux"):
        return {"start_new_session": True, "preexec_fn": _die_with_parent}
    return {"start_new_session": True}


class Child:
    def __init__(self, name: str, start):
        self.name, self._start = name, start
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        self.process = self._start()

    def exited(self) -> int | None:
        return self.process.poll() if self.process else None


def celery_worker_argv(*, queues: list[str], slots: int, name: str) -> list[str]:
    """The Celery worker of `serve` and of `manage.py worker`: a thread per slot (each waits while its model's
    scheduler decodes it with the others), one message prefetched per thread, queues changed later by the
    worker itself (inference/worker.py) as models come and go."""
    return [
        sys.executable, "-m", "celery", "-A", "minerva_project", "worker",
        "--queues", ",".join(queues),
        "--pool", "threads", "--concurrency", str(slots),
        "--prefetch-multiplier", "1",
        "--without-gossip", "--without-mingle",
        "--hostname", name,
        "--loglevel", "INFO",
    ]  # fmt: skip


def worker_plan(names: set[str] | None) -> tuple[list[str], int]:
    """The queues a worker on this host starts with (the models whose files are here, within `names`) and its
    default slots: the sum of those models' slots, at least MINERVA_PARALLEL, so a model added later has threads."""
    hosted = models_hosted(names=names)
    models = list(LanguageModel.objects.filter(name__in=hosted))
    # The pull queue's task only starts a thread of its own (models_app/tasks.py), so it takes no slot.
    queues = [*([m.queue for m in models] or ["minerva.default"]), PULL_QUEUE]
    return queues, max(sum(model_parallel(m) for m in models), settings.PARALLEL)


class Command(BaseCommand):
    help = "Serve the OpenAI-compatible API: embedded Redis, a Celery worker and daphne, supervised."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=settings.HOST)
        parser.add_argument("--port", type=int, default=settings.PORT)
        parser.add_argument("--no-worker", action="store_true",
                            help="an API host only: the workers run elsewhere (manage.py worker)")  # fmt: skip

    def handle(self, *args, host: str, port: int, no_worker: bool = False, **options):
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        if settings.AUTH == "off" and auth_required_without_override(host):
            self.stderr.write(self.style.ERROR(
                f"WARNING: MINERVA_AUTH=off and listening on {host}: anyone who can reach this port can use "
                "every model without a key. Unset MINERVA_AUTH to require keys."))  # fmt: skip
        self.stopping = False
        env = dict(os.environ)
        # Every process decides from the address actually bound (keys required beyond loopback, allowed Host
        # headers), not from a MINERVA_HOST that `--host` overrode.
        env["MINERVA_HOST"] = settings.HOST = host
        self.instance = env["MINERVA_INSTANCE_ID"] = f"{socket.gethostname()}:{port}"
        children: list[Child] = []
        redis_socket = Path(settings.REDIS_URL.removeprefix("unix://"))

        if settings.EMBEDDED_REDIS:
            children.append(Child("redis", lambda: start_embedded_redis(redis_socket, **child_options())))
            env["MINERVA_REDIS_URL"] = settings.REDIS_URL
        if not no_worker:
            result = models_scan()  # new, changed and vanished model files, before the worker's queues are fixed
            self.stdout.write(f"models: {len(result.added)} added, {len(result.changed)} changed, "
                              f"{len(result.unavailable)} unavailable, {len(result.errors)} skipped")  # fmt: skip
            queues, slots = worker_plan(None)
            worker_cmd = celery_worker_argv(queues=queues, slots=slots, name=f"minerva-{port}@{HOST}")
            children.append(Child("worker", lambda: self._spawn(worker_cmd, env)))
        else:
            queues = ["none here (--no-worker)"]
        # serve binds the port and every daphne process accepts on it (`--fd`): one process is the default; several
        # spread the streams' Python work over cores (MINERVA_WEB_PROCESSES), and a restarted one binds nothing.
        listener = self._listen(host, port)
        daphne_cmd = [
            sys.executable, "-m", "minerva_project.daphne", "--fd", str(listener.fileno()),
            "--application-close-timeout", "5", "minerva_project.asgi:application",
        ]  # fmt: skip
        for _ in range(settings.WEB_PROCESSES):
            children.append(Child("daphne", lambda: self._spawn(daphne_cmd, env, pass_fds=(listener.fileno(),))))

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._request_stop)
        try:
            for child in children:
                child.start()
            self._wait_for_port(host, port, children)
            self._redis(lambda r: r.delete(DRAINING_KEY.format(self.instance)))  # a previous run's flag
            if not self.stopping:
                self.stdout.write(f"Minerva is serving http://{host}:{port}/v1 (models: {', '.join(queues)})")
                self.stdout.flush()  # at once, also into a file or pipe (a supervisor or a test waits for it)
            self._supervise(children)
        finally:
            # New requests get a 503 from now on; the worker drains, then daphne (which delivers the running
            # streams' last events) stops, and Redis, which both talk to, goes last.
            self._redis(lambda r: r.set(DRAINING_KEY.format(self.instance), "1", ex=60))
            self._stop([c for c in children if c.name == "worker"], WORKER_GRACE_SECONDS)
            self._stop([c for c in children if c.name == "daphne"], DAPHNE_GRACE_SECONDS)
            self._stop([c for c in children if c.name == "redis"], 1)
            if settings.EMBEDDED_REDIS and redis_socket.exists():
                redis_socket.unlink()

    def _spawn(self, cmd: list[str], env: dict, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, cwd=settings.BASE_DIR, pass_fds=pass_fds, **child_options())

    def _listen(self, host: str, port: int) -> socket.socket:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            return socket.create_server((host, port), family=family, backlog=1024)
        except OSError as exc:
            raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    def _request_stop(self, signum, frame) -> None:
        self.stopping = True

    def _wait_for_port(self, host: str, port: int, children: list[Child]) -> None:
        """Until daphne answers: `serve` holds the listening socket, so a connection is taken into its backlog at once;
        only an answer (any, to a /health) says a daphne accepts. A child that exits meanwhile is an error."""
        deadline = time.monotonic() + 60
        while not self.stopping and time.monotonic() < deadline:
            for child in children:
                if child.exited() is not None:
                    raise CommandError(f"{child.name} exited with code {child.exited()} during start-up")
            try:
                with socket.create_connection((host, port), timeout=0.5) as conn:
                    conn.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if conn.recv(1):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        if not self.stopping:
            raise CommandError(f"daphne did not answer on {host}:{port} within 60 s")

    def _supervise(self, children: list[Child]) -> None:
        while not self.stopping:
            for child in children:
                code = child.exited()
                if code is not None and not self.stopping:
                    self.stderr.write(f"{child.name} exited with code {code}; restarting it")
                    if child.name == "worker":  # its requests' views need not wait for its heartbeat to expire
                        self._redis(lambda r, pid=child.process.pid: worker_dead(f"{HOST}:{pid}"))
                    time.sleep(min(RESTART_BACKOFF_SECONDS * (child.restarts + 1), 10))
                    child.restarts += 1
                    child.start()
            time.sleep(0.2)

    def _redis(self, command) -> None:
        try:
            command(get_redis())
        except RedisError:
            self.stderr.write("Redis is unavailable; carrying on")

    def _stop(self, children: list[Child], grace: float) -> None:
        """SIGTERM each, then SIGKILL whatever outlives the grace period."""
        running = [c.process for c in children if c.process and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
