import pytest
from asgiref.sync import sync_to_async
from django.db import connections


@pytest.fixture(autouse=True)
async def _close_thread_connections():
    """Async views reach the database from asgiref's worker thread; close its connection after each test so
    PostgreSQL can drop the test database at the end."""
    yield
    await sync_to_async(connections.close_all)()
