"""The Celery app. Each model has its own queue (`minerva.model.<name>`); a worker consumes the queues of the
models it serves, so work for a model only reaches a process that can load it."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "minerva_project.settings")

app = Celery("minerva")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
