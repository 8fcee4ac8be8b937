"""`python manage.py worker`: a worker host of a cluster. It serves the models whose files are in this host's
MINERVA_MODELS_DIR (all of them, or those named), on the shared Redis and database; no daphne, no embedded Redis.

The process becomes the Celery worker itself (exec), so a supervisor (systemd, docker) signals and restarts it
directly; the worker picks up models added later on its own (inference/worker.py)."""

import os

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.workers import HOST
from models_app.bundled import embedding_model_path
from models_app.services import bundled_dir

from .serve import celery_worker_argv, worker_plan


class Command(BaseCommand):
    help = "Run a worker host: a Celery worker for the models in this host's models folder, on a shared Redis."

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--models", help="comma-separated model names to serve (only those this host has)")
        which.add_argument("--all", action="store_true", help="serve every model this host has (the default)")
        parser.add_argument("--slots", type=int, help="task threads: requests run at once, over all its models "
                            "(default: the sum of its models' slots, at least MINERVA_PARALLEL)")  # fmt: skip

    def handle(self, *args, models: str | None, slots: int | None, **options):
        if settings.EMBEDDED_REDIS:
            raise CommandError("a worker host needs the cluster's Redis: set MINERVA_REDIS_URL (redis://host:6379/0)")
        if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3") and not os.environ.get("MINERVA_DB_PATH"):
            raise CommandError("a worker host needs the cluster's database: set MINERVA_DATABASE_URL (postgres://...)")
        if slots is not None and slots < 1:
            raise CommandError("--slots must be at least 1")
        names = {n.strip() for n in models.split(",") if n.strip()} if models else None
        try:
            embedding_model_path(bundled_dir())  # the bundled embedding model, written to GGUF once per host
        except (OSError, ValueError) as exc:
            self.stderr.write(f"the bundled embedding model is unavailable: {exc}")
        queues, default_slots = worker_plan(names)
        self.stdout.write(f"worker on {HOST}: queues {', '.join(queues)}")
        self.stdout.flush()
        env = dict(os.environ, MINERVA_WORKER_MODELS=",".join(sorted(names)) if names else "*")
        # exec keeps this pid, so the Celery name can carry it: several workers on one host stay distinct.
        argv = celery_worker_argv(queues=queues, slots=slots or default_slots, name=f"minerva-{os.getpid()}@{HOST}")
        os.execve(argv[0], argv, env)
