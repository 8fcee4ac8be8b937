import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from minerva_project import celery_app


@pytest.fixture(autouse=True)
async def _close_thread_connections():
    """Async views reach the database from asgiref's worker thread; close its connection after each test so
    PostgreSQL can drop the test database at the end."""
    yield
    await sync_to_async(connections.close_all)()


@pytest.fixture
def files_dir(settings, tmp_path):
    settings.FILES_DIR = tmp_path
    return tmp_path


@pytest.fixture
def lanes_left_queued():
    """Lanes go to the model's real Redis queue, where no worker takes them: the test runs lines by hand."""
    celery_app.conf.task_always_eager = False
    yield
    celery_app.conf.task_always_eager = True
