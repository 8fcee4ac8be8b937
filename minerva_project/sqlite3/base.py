"""Django's SQLite backend, keeping closed connections open for the next one (a pool per process, last in first out).

Django gives each ASGI request a connection of its own and closes it when the request ends; opening a SQLite
connection (the file, its PRAGMAs, the schema read on the first statement) cost 1.2-2 ms of every request's first
token on a 2-core box. PostgreSQL has Django's own pool for this (`OPTIONS["pool"]`); SQLite has none.
"""

import os
import queue
import sqlite3

from django.db.backends.sqlite3 import base

POOL_SIZE = 8  # connections kept per process; more are closed (daphne's requests use one each, briefly)


class DatabaseWrapper(base.DatabaseWrapper):
    _pools: dict[tuple[int, str], queue.LifoQueue] = {}  # (process id, what it was opened with) -> open connections
    _kept_in: queue.LifoQueue | None = None  # the pool this wrapper's connection goes back to

    def _pool(self, conn_params: dict) -> queue.LifoQueue:
        # By process (a connection inherited across fork() must not be used by both) and by what it was opened with:
        # another file or another busy timeout is another pool.
        key = (os.getpid(), repr(sorted(conn_params.items())))
        return self._pools.setdefault(key, queue.LifoQueue(POOL_SIZE))

    def get_new_connection(self, conn_params):
        self._kept_in = None if self.is_in_memory_db() else self._pool(conn_params)
        if self._kept_in is not None:
            try:
                return self._kept_in.get_nowait()
            except queue.Empty:
                pass
        return super().get_new_connection(conn_params)

    def _close(self):
        connection, pool = self.connection, self._kept_in
        if connection is None or pool is None:
            return super()._close()
        try:
            if connection.in_transaction:  # closed inside a transaction: what it did is undone, as a close would
                connection.rollback()
            pool.put_nowait(connection)
        except (queue.Full, sqlite3.Error):
            with self.wrap_database_errors:
                connection.close()
