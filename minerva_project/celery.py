"""The Celery app. Each model has its own queue (`minerva.model.<name>`); a worker consumes the queues of the
models it serves, so work for a model only reaches a process that can load it."""

import logging
import os
import threading

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minerva_project.settings")

app = Celery("minerva")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_ready.connect
def _start_heartbeat(sender, **kwargs) -> None:
    """Beat every few seconds so /ready and /metrics know a worker is up, and for which model queues."""
    from inference.metrics import WORKER_BEAT_SECONDS, worker_beat

    queues = [q.name for q in sender.app.amqp.queues.consume_from.values()]

    def beat() -> None:
        while True:
            try:
                worker_beat(queues)
            except Exception:  # Redis restarting: try again next beat
                logging.getLogger(__name__).warning("worker heartbeat failed", exc_info=True)
            threading.Event().wait(WORKER_BEAT_SECONDS)

    threading.Thread(target=beat, name="minerva-heartbeat", daemon=True).start()
